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
    assert_eq!(layer.clone().with_retry_after(Duration::MAX).unwrap_err(), ConfigError::TooLong("retry after"));

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
        .with_retry_after(longest)
        .unwrap();
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
    assert_eq!(conflict.headers[header::RETRY_AFTER], longest.as_secs().to_string().as_str());
    gate.open(1);
    assert_eq!(first.await.unwrap().status, 201);
}

#[tokio::test(start_paused = true)]
async fn lease_and_ceiling_give_the_same_layer_in_either_order() {
    let (lease, ceiling) = (Duration::from_secs(3), Duration::from_secs(2));
    let ceiling_first = IdempotencyLayer::memory().with_lease_ceiling(ceiling).unwrap().with_lease(lease).unwrap();
    let lease_first = IdempotencyLayer::memory().with_lease(lease).unwrap().with_lease_ceiling(ceiling).unwrap();
    for layer in [ceiling_first, lease_first] {
        // A ceiling below the lease: the claim is never renewed.
        let (app, calls) = counted(&layer, |n, _| async move {
            if n == 1 {
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
            respond(201, format!("call {n}"))
        });
        let first = tokio::spawn(send_owned(app.clone(), post(KEY, "a")));
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(send(&app, post(KEY, "a")).await.body, "call 2", "one lease, no renewal");
        first.await.unwrap();
        assert_eq!(calls.get(), 2);
    }
}

#[test]
fn every_duration_setting_refuses_zero() {
    let layer = IdempotencyLayer::memory();
    assert_eq!(layer.clone().with_retry_after(Duration::ZERO).unwrap_err(), ConfigError::Zero("retry after"));
    assert_eq!(layer.clone().with_lease(Duration::ZERO).unwrap_err(), ConfigError::Zero("lease"));
    assert_eq!(layer.clone().with_lease_ceiling(Duration::ZERO).unwrap_err(), ConfigError::Zero("lease ceiling"));
    assert_eq!(layer.clone().with_retention(Duration::ZERO).unwrap_err(), ConfigError::Zero("retention"));
    assert_eq!(layer.clone().with_body_timeout(Duration::ZERO).unwrap_err(), ConfigError::Zero("body timeout"));
    assert_eq!(layer.with_store_timeout(Duration::ZERO).unwrap_err(), ConfigError::Zero("store timeout"));
}
