//! Failures of the handler and the client.

use super::*;

#[tokio::test]
async fn panicking_handler_gives_500_and_releases_the_key() {
    // A slow release: the 500 must still wait for it.
    let layer = IdempotencyLayer::new(Slowed { release: Duration::from_millis(100), ..Slowed::default() });
    let (app, calls) = counted(&layer, move |n, _| async move {
        if n == 1 {
            panic!("handler bug");
        }
        respond(201, "second try")
    });
    let crashed = send(&app, post(KEY, "a")).await;
    assert_eq!((crashed.status.as_u16(), crashed.problem().as_str()), (500, "handler-panicked"));
    // The key is released before the 500 goes out: a retry sent at once runs.
    let retry = send(&app, post(KEY, "a")).await;
    assert_eq!((retry.status.as_u16(), &retry.body[..]), (201, &b"second try"[..]));
    assert_eq!(calls.get(), 2);
}

#[tokio::test]
async fn client_disconnect_does_not_stop_the_handler_and_its_result_is_stored() {
    let layer = IdempotencyLayer::memory().with_in_flight(InFlightPolicy::Wait(Duration::from_secs(30)));
    let (app, gate, calls, first) = parked(layer).await;
    first.abort(); // the client goes away while the handler runs
    assert!(first.await.unwrap_err().is_cancelled());
    let retry = tokio::spawn(send_owned(app.clone(), post(KEY, "amount=100")));
    gate.open(1);
    let retry = retry.await.unwrap();
    assert_eq!((retry.status.as_u16(), &retry.body[..], retry.replayed()), (201, &b"charge 1"[..], true));
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn client_disconnect_mid_stream_still_records_the_whole_body() {
    let layer = IdempotencyLayer::memory().with_in_flight(InFlightPolicy::Wait(Duration::from_secs(30)));
    let (chunks, rx) = mpsc::channel::<&'static str>(4);
    let rx = std::sync::Arc::new(std::sync::Mutex::new(Some(rx)));
    let (app, calls) = counted(&layer, move |_, _| {
        let rx = rx.lock().unwrap().take().expect("one execution");
        async move {
            let frames = stream::unfold(rx, |mut rx| async move {
                let chunk = rx.recv().await?;
                Some((Ok::<_, std::io::Error>(Frame::data(Bytes::from(chunk))), rx))
            });
            Response::new(BodyExt::boxed(StreamBody::new(frames)))
        }
    });
    let response = app.clone().oneshot(post(KEY, "a")).await.unwrap();
    let mut body = response.into_body();
    chunks.send("first ").await.unwrap();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "first ");
    drop(body); // the client hangs up mid-stream
    chunks.send("second ").await.unwrap();
    chunks.send("third").await.unwrap();
    drop(chunks);
    let retry = send(&app, post(KEY, "a")).await;
    assert_eq!((&retry.body[..], retry.replayed()), (&b"first second third"[..], true));
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn a_client_that_read_the_whole_stream_gets_the_replay_at_once() {
    // The end of a streamed body is held back until the record is stored,
    // so this duplicate can never see 409.
    let layer = IdempotencyLayer::memory();
    let (app, calls) = counted(&layer, move |_, _| async { Response::new(streaming_body(&["a", "b", "c"], None)) });
    for round in 0..50 {
        let key = format!("k{round}");
        let request = || {
            Request::post("/")
                .header("idempotency-key", key.as_str())
                .header("authorization", AUTH)
                .body(Full::default())
                .unwrap()
        };
        assert_eq!(send(&app, request()).await.body, "abc");
        let replay = send(&app, request()).await;
        assert_eq!((replay.status.as_u16(), replay.replayed()), (200, true), "round {round}");
    }
    assert_eq!(calls.get(), 50);
}
