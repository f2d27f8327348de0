//! Configuration at its extremes.

use super::*;

#[tokio::test]
async fn durations_past_ten_years_are_refused_and_the_longest_accepted_work() {
    let layer = IdempotencyLayer::memory();
    assert_eq!(layer.clone().with_lease(Duration::MAX).unwrap_err(), ConfigError::TooLong("lease"));
    assert_eq!(layer.clone().with_lease_ceiling(Duration::MAX).unwrap_err(), ConfigError::TooLong("lease ceiling"));
    assert_eq!(layer.clone().with_retention(Duration::MAX).unwrap_err(), ConfigError::TooLong("retention"));
    assert_eq!(layer.clone().with_body_timeout(Duration::MAX).unwrap_err(), ConfigError::TooLong("body timeout"));
    assert_eq!(layer.clone().with_store_timeout(Duration::MAX).unwrap_err(), ConfigError::TooLong("store timeout"));

    let longest = tower_idempotency::MAX_DURATION;
    let layer = layer
        .with_lease_ceiling(longest)
        .unwrap()
        .with_lease(longest)
        .unwrap()
        .with_retention(longest)
        .unwrap()
        .with_body_timeout(longest)
        .unwrap()
        .with_store_timeout(longest)
        .unwrap()
        .with_retry_after(Duration::MAX);
    let waiting = layer.clone().with_in_flight(InFlightPolicy::Wait(Duration::MAX));
    let (app, gate, calls) = gated(&waiting);
    let first = tokio::spawn(send_owned(app.clone(), hold("k")));
    gate.entered(1).await;
    let waiter = tokio::spawn(send_owned(app.clone(), hold("k")));
    tokio::task::yield_now().await;
    gate.open(2);
    assert_eq!(first.await.unwrap().status, 201);
    assert_eq!(waiter.await.unwrap().status, 201);
    assert_eq!(calls.get(), 1);

    let (app, gate, _) = gated(&layer);
    let first = tokio::spawn(send_owned(app.clone(), hold("k2")));
    gate.entered(1).await;
    let conflict = send(&app, hold("k2")).await;
    assert_eq!(conflict.status, 409);
    assert_eq!(conflict.headers[header::RETRY_AFTER], u64::MAX.to_string().as_str());
    gate.open(1);
    assert_eq!(first.await.unwrap().status, 201);
}
