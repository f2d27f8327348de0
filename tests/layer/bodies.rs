//! Bodies.

use super::*;

#[tokio::test]
async fn request_body_over_the_cap_is_413_and_runs_nothing() {
    let (app, calls) = counting(&IdempotencyLayer::memory().with_body_limit(8));
    let declared = send(&app, post(KEY, "123456789")).await;
    assert_eq!((declared.status.as_u16(), declared.problem().as_str()), (413, "body-too-large"));
    assert_eq!(send(&app, post(KEY, "12345678")).await.status, 201, "exactly the cap is fine");
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn streamed_request_body_over_the_cap_is_413() {
    let layer = IdempotencyLayer::memory().with_body_limit(8);
    let calls = Calls::default();
    let counter = calls.clone();
    let inner = tower::service_fn(move |_: Request<RequestBody<TestBody>>| {
        counter.bump();
        async { Ok::<_, Infallible>(respond(201, "")) }
    });
    let service = tower::Layer::layer(&layer, inner);
    // No length declared: the cap is found while reading.
    let body = streaming_body(&["12345", "67890"], None);
    let request = Request::post("/").header("idempotency-key", "k").header("authorization", AUTH).body(body).unwrap();
    let answer = read(service.oneshot(request).await.unwrap()).await;
    assert_eq!(answer.status, 413);
    assert_eq!(calls.get(), 0);
}

#[tokio::test]
async fn failing_request_body_is_400() {
    let layer = IdempotencyLayer::memory();
    let calls = Calls::default();
    let counter = calls.clone();
    let inner = tower::service_fn(move |_: Request<RequestBody<TestBody>>| {
        counter.bump();
        async { Ok::<_, Infallible>(respond(201, "")) }
    });
    let service = tower::Layer::layer(&layer, inner);
    let frames: Vec<Result<Frame<Bytes>, std::io::Error>> =
        vec![Ok(Frame::data(Bytes::from("12"))), Err(std::io::Error::other("connection reset"))];
    let request = Request::post("/")
        .header("idempotency-key", "k")
        .header("authorization", AUTH)
        .body(BodyExt::boxed(StreamBody::new(stream::iter(frames))))
        .unwrap();
    let answer = read(service.oneshot(request).await.unwrap()).await;
    assert_eq!((answer.status.as_u16(), answer.problem().as_str()), (400, "invalid-body"));
    assert_eq!(calls.get(), 0);
}

#[tokio::test]
async fn response_over_the_storage_cap_is_delivered_once_and_never_rerun() {
    let layer = IdempotencyLayer::memory().with_response_limit(10);
    let (app, calls) =
        counted(&layer, move |_, _| async { Response::new(streaming_body(&["0123456789", "abcdef"], None)) });
    let first = send(&app, post(KEY, "a")).await;
    assert_eq!(first.body, "0123456789abcdef", "delivered in full");
    let duplicate = send(&app, post(KEY, "a")).await;
    assert_eq!((duplicate.status.as_u16(), duplicate.problem().as_str()), (410, "response-not-stored"));
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn a_response_body_that_fails_midway_is_never_rerun() {
    let layer = IdempotencyLayer::memory();
    let (app, calls) = counted(&layer, move |_, _| async {
        let frames =
            stream::iter(vec![Ok(Frame::data(Bytes::from("partial"))), Err(std::io::Error::other("upstream reset"))])
                .then(|frame: Result<Frame<Bytes>, std::io::Error>| async move {
                    tokio::task::yield_now().await;
                    frame
                });
        Response::new(BodyExt::boxed(StreamBody::new(frames)))
    });
    let response = app.clone().oneshot(post(KEY, "a")).await.unwrap();
    assert!(response.into_body().collect().await.is_err(), "the client sees the failure");
    assert_eq!(send(&app, post(KEY, "a")).await.status, 410);
    assert_eq!(calls.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_cannot_hold_the_key_in_flight() {
    let layer = IdempotencyLayer::memory();
    // Twenty frames, all ready once the first has waited: more than a slow
    // client's buffer holds.
    let (app, calls) = counted(&layer, move |_, _| async {
        let frames = stream::iter(0..20u8).then(|i| async move {
            if i == 0 {
                tokio::task::yield_now().await;
            }
            Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![b'a' + i; 100])))
        });
        Response::new(BodyExt::boxed(StreamBody::new(frames)))
    });
    // The client reads the head, then nothing more, and stays connected.
    let unread = app.clone().oneshot(post(KEY, "a")).await.unwrap();
    let id = RecordId::new("", &test_scope(), &"order-1".parse().unwrap());
    let claim = ClaimRequest::new(id, tower_idempotency::Fingerprint::from_bytes([0; 32]), Duration::from_secs(30));
    layer.store().wait(&claim, Duration::from_secs(60)).await.unwrap();
    let state = layer.lookup(&test_scope(), &"order-1".parse().unwrap()).await.unwrap();
    assert!(matches!(state, Some(RecordState::Completed(_))), "recorded although the client reads nothing: {state:?}");
    let replay = send(&app, post(KEY, "a")).await;
    assert!(replay.replayed());
    assert_eq!(replay.body.len(), 2_000);
    assert_eq!(calls.get(), 1);
    let read = read(unread).await;
    assert_eq!(read.body, replay.body, "the slow client still gets every byte");
}
