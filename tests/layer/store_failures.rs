//! The store failing.

use super::*;

/// A store that fails every call, never answers, or finds a record it
/// cannot read (one written by a newer version, say).
#[derive(Clone)]
struct BrokenStore {
    hang: bool,
    unreadable: bool,
}

impl BrokenStore {
    const DOWN: Self = Self { hang: false, unreadable: false };

    async fn fail<T>(&self) -> Result<T, StoreError> {
        if self.hang {
            std::future::pending::<()>().await;
        }
        if self.unreadable {
            return Err(StoreError::Corrupt(tower_idempotency::DecodeError::UnknownVersion(9)));
        }
        Err(StoreError::unavailable("connection refused"))
    }
}

impl Store for BrokenStore {
    async fn claim(&self, _: ClaimRequest) -> Result<Claim, StoreError> {
        self.fail().await
    }
    async fn complete(
        &self,
        _: &RecordId,
        _: OwnerToken,
        _: tower_idempotency::Record,
        _: Duration,
    ) -> Result<(), StoreError> {
        self.fail().await
    }
    async fn release(&self, _: &RecordId, _: OwnerToken) -> Result<(), StoreError> {
        self.fail().await
    }
    async fn renew(&self, _: &RecordId, _: OwnerToken, _: Duration) -> Result<(), StoreError> {
        self.fail().await
    }
    async fn lookup(&self, _: &RecordId) -> Result<Option<RecordState>, StoreError> {
        self.fail().await
    }
}

#[tokio::test]
async fn store_down_fails_closed_with_503_by_default() {
    let layer = IdempotencyLayer::new(BrokenStore::DOWN);
    let (app, calls) = counting(&layer);
    let answer = send(&app, post(KEY, "a")).await;
    assert_eq!((answer.status.as_u16(), answer.problem().as_str()), (503, "store-unavailable"));
    assert!(answer.headers.contains_key(header::RETRY_AFTER));
    assert_eq!(calls.get(), 0);
    assert_eq!(layer.metrics().get(Outcome::StoreError), 1);
}

#[tokio::test]
async fn slow_store_times_out_into_the_failure_path() {
    let layer = IdempotencyLayer::new(BrokenStore { hang: true, ..BrokenStore::DOWN })
        .with_store_timeout(Duration::from_millis(50))
        .unwrap();
    let (app, calls) = counting(&layer);
    assert_eq!(send(&app, post(KEY, "a")).await.status, 503);
    assert_eq!(calls.get(), 0);
}

#[tokio::test]
async fn store_down_fails_open_when_configured() {
    let layer = IdempotencyLayer::new(BrokenStore::DOWN).with_failure_mode(FailureMode::FailOpen);
    let (app, calls) = counting(&layer);
    assert_eq!(send(&app, post(KEY, "a")).await.status, 201);
    assert_eq!(send(&app, post(KEY, "a")).await.status, 201);
    assert_eq!(calls.get(), 2, "unguarded: every request runs");
    assert_eq!(layer.metrics().get(Outcome::FailedOpen), 2);
}

#[tokio::test]
async fn a_full_memory_store_drops_its_oldest_completed_records_to_take_new_keys() {
    let layer = IdempotencyLayer::new(MemoryStore::with_limits(50, usize::MAX));
    let (app, calls) = counting(&layer);
    for n in 0..120 {
        let key = format!("order-{n}");
        let answer = send(&app, post(Some(key.as_str()), "")).await;
        assert_eq!(answer.status, 201, "key {n} of 120 on a store of 50");
    }
    assert_eq!(calls.get(), 120);
    for n in 110..120 {
        let key = format!("order-{n}");
        assert!(send(&app, post(Some(key.as_str()), "")).await.replayed(), "key {n}, among the newest, replays");
    }
    assert_eq!(calls.get(), 120);
    assert!(
        layer.metrics().get(Outcome::Evicted) >= 70,
        "drops are counted: {}",
        layer.metrics().get(Outcome::Evicted)
    );
    assert!(layer.store().len() <= 50);
}

#[tokio::test]
async fn a_memory_store_full_of_in_flight_records_refuses_new_keys_with_503() {
    let layer = IdempotencyLayer::new(MemoryStore::with_limits(1, usize::MAX));
    let (app, gate, calls) = gated(&layer);
    let first = tokio::spawn(send_owned(app.clone(), hold("a")));
    gate.entered(1).await;
    let refused = send(&app, post(Some("b"), "")).await;
    assert_eq!((refused.status.as_u16(), refused.problem().as_str()), (503, "store-full"));
    assert!(refused.headers.contains_key(header::RETRY_AFTER));
    assert_eq!(layer.metrics().get(Outcome::StoreFull), 1, "told apart from a store that is down");
    assert_eq!(layer.metrics().get(Outcome::StoreError), 0);
    gate.open(1);
    assert_eq!(first.await.unwrap().status, 201);
    assert_eq!(calls.get(), 1, "the refused key ran nothing");
    assert!(send(&app, hold("a")).await.replayed(), "the in-flight record was never dropped");
}

#[tokio::test(start_paused = true)]
async fn fail_open_never_runs_a_request_the_store_already_called_in_flight() {
    // The third claim (the waiting duplicate's second) never answers.
    let store = Slowed { claims_hang_from: 3, ..Slowed::default() };
    let layer = IdempotencyLayer::new(store.clone())
        .with_failure_mode(FailureMode::FailOpen)
        .with_in_flight(InFlightPolicy::Wait(Duration::from_secs(5)));
    let (app, gate, calls) = gated(&layer);
    let (first, duplicate) = first_then_waiting_duplicate(&app, &gate, &store, "k").await;
    assert_eq!(first.status, 201);
    assert_eq!((duplicate.status.as_u16(), duplicate.problem().as_str()), (503, "store-unavailable"));
    assert_eq!(calls.get(), 1, "the store had said in flight: the duplicate must not run unguarded");
}

#[tokio::test]
async fn fail_open_never_runs_a_key_whose_record_the_store_holds_but_cannot_read() {
    let layer = IdempotencyLayer::new(BrokenStore { unreadable: true, ..BrokenStore::DOWN })
        .with_failure_mode(FailureMode::FailOpen);
    let (app, calls) = counting(&layer);
    let answer = send(&app, post(KEY, "a")).await;
    assert_eq!((answer.status.as_u16(), answer.problem().as_str()), (503, "store-unavailable"));
    assert_eq!(calls.get(), 0);
}
