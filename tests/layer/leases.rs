//! Leases.

use super::*;

/// A handler that takes `first_takes` on its first call and answers at once
/// after that.
fn slow_first(layer: &IdempotencyLayer, first_takes: Duration) -> (App, Calls) {
    let (app, calls) = counted(layer, move |n, _| async move {
        if n == 1 {
            tokio::time::sleep(first_takes).await;
        }
        respond(201, format!("call {n}"))
    });
    (app, calls)
}

#[tokio::test(start_paused = true)]
async fn lease_is_renewed_while_the_handler_runs() {
    let layer = IdempotencyLayer::memory().with_lease(Duration::from_secs(3)).unwrap();
    let (app, calls) = slow_first(&layer, Duration::from_secs(10));
    let first = tokio::spawn(send_owned(app.clone(), post(KEY, "a")));
    // Well past one lease: only renewals keep the claim alive.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(send(&app, post(KEY, "a")).await.status, 409);
    assert_eq!(first.await.unwrap().body, "call 1");
    assert!(send(&app, post(KEY, "a")).await.replayed());
    assert_eq!(calls.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn renewal_stops_at_the_lease_ceiling() {
    let layer = IdempotencyLayer::memory()
        .with_lease(Duration::from_secs(3))
        .unwrap()
        .with_lease_ceiling(Duration::from_secs(6))
        .unwrap();
    let (app, calls) = slow_first(&layer, Duration::from_secs(60));
    let first = tokio::spawn(send_owned(app.clone(), post(KEY, "a")));
    tokio::time::sleep(Duration::from_secs(12)).await;
    let second = send(&app, post(KEY, "a")).await;
    assert_eq!((second.status.as_u16(), &second.body[..]), (201, &b"call 2"[..]), "the stuck claim expired");
    assert_eq!(first.await.unwrap().body, "call 1", "the late first answer still reaches its client");
    assert_eq!(calls.get(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_streaming_body_keeps_its_lease_renewed_across_frames() {
    // Renewals take 50 ms, and the body sends a frame every 20 ms for 3 s:
    // a renewal must survive the frames that come while it is on its way.
    let store = Slowed { renew: Duration::from_millis(50), ..Slowed::default() };
    let layer = IdempotencyLayer::new(store.clone()).with_lease(Duration::from_millis(300)).unwrap();
    let halfway = std::sync::Arc::new(tokio::sync::Notify::new());
    let reached = halfway.clone();
    let (app, calls) = counted(&layer, move |_, _| {
        let halfway = halfway.clone();
        async move {
            let frames = stream::iter(0..150u32).then(move |i| {
                let halfway = halfway.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if i == 75 {
                        halfway.notify_one();
                    }
                    Ok::<_, std::io::Error>(Frame::data(Bytes::from(format!("{i},"))))
                }
            });
            Response::new(BodyExt::boxed(StreamBody::new(frames)))
        }
    });
    let first = tokio::spawn(send_owned(app.clone(), post(KEY, "a")));
    // 1.5 s in: five leases, kept only by renewals.
    reached.notified().await;
    let duplicate = send(&app, post(KEY, "a")).await;
    assert_eq!(duplicate.status, 409, "the streaming request still holds its key");
    let first = first.await.unwrap();
    assert!(first.body.ends_with(b"149,"));
    let replay = send(&app, post(KEY, "a")).await;
    assert!(replay.replayed());
    assert_eq!(replay.body, first.body);
    assert_eq!(calls.get(), 1);
    // One renewal at a time, a third of a lease apart, not one per frame.
    assert!(store.renewals.get() <= 3_000 / 100 + 2, "{} renewals in 3 s", store.renewals.get());
}
