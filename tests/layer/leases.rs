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
