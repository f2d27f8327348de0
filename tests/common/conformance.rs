//! One conformance suite for every store, written against the `Store` trait
//! only. A store runs it with one line:
//!
//! ```ignore
//! mod memory { conformance_tests!(async { (MemoryStore::new(), ()) }); }
//! ```
//!
//! The expression yields the store and a guard kept alive for the test (a
//! Redis server, say).

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tower_idempotency::{
    FencingToken, Fingerprint, IdempotencyKey, Record, RecordId, Scope, StoredResponse,
    store::{Claim, ClaimRequest, Lease, OwnerToken, RecordState, Store, StoreError},
};

#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::conformance_tests!(@each $make;
            claim_then_duplicate_is_in_flight,
            race_of_64_claims_has_one_winner,
            fencing_tokens_grow_across_release_and_expiry,
            only_the_owner_can_complete_release_or_renew,
            stale_owner_changes_nothing_after_its_lease_ran_out,
            renew_extends_the_lease,
            completed_record_is_returned_byte_for_byte,
            retention_expires_completed_records,
            lookup_reports_each_state,
            replace_completed_takes_over_a_finished_record,
            wait_wakes_when_the_record_completes,
            wait_returns_at_once_for_a_finished_record,
            records_are_independent
        );
    };
    // A store whose claims live as long as their owner's transaction (the
    // transactional PostgreSQL store): every rule but a lease that runs out
    // under a live owner.
    (transaction_bound: $make:expr) => {
        $crate::conformance_tests!(@each $make;
            claim_then_duplicate_is_in_flight,
            race_of_64_claims_has_one_winner,
            only_the_owner_can_complete_release_or_renew,
            renew_extends_the_lease,
            completed_record_is_returned_byte_for_byte,
            retention_expires_completed_records,
            lookup_reports_each_state,
            replace_completed_takes_over_a_finished_record,
            wait_wakes_when_the_record_completes,
            wait_returns_at_once_for_a_finished_record,
            records_are_independent
        );
    };
    // A store whose claims take no fencing token: every rule whose test does
    // not compare tokens (tests/redis.rs checks a stale owner without them).
    (no_fencing: $make:expr) => {
        $crate::conformance_tests!(@each $make;
            claim_then_duplicate_is_in_flight,
            race_of_64_claims_has_one_winner,
            only_the_owner_can_complete_release_or_renew,
            renew_extends_the_lease,
            completed_record_is_returned_byte_for_byte,
            lookup_reports_each_state,
            replace_completed_takes_over_a_finished_record,
            wait_wakes_when_the_record_completes,
            wait_returns_at_once_for_a_finished_record,
            records_are_independent
        );
    };
    (@each $make:expr; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (store, _guard) = $make.await;
                $crate::common::conformance::$name(&store).await;
            }
        )*
    };
}

const LEASE: Duration = Duration::from_secs(30);
const SHORT: Duration = Duration::from_millis(200);
/// Long enough for a `SHORT` lease or retention to have run out.
const PAST_SHORT: Duration = Duration::from_millis(600);

/// A record id no other test (or earlier run against a shared server) uses.
pub fn fresh_id() -> RecordId {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos();
    let namespace = format!("conformance-{nanos}-{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let key: IdempotencyKey = "key".parse().unwrap();
    RecordId::new(&namespace, &Scope::anonymous(), &key)
}

fn fingerprint(n: u8) -> Fingerprint {
    Fingerprint::from_bytes([n; 32])
}

pub fn sample_record(fp: Fingerprint) -> Record {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", "application/octet-stream".parse().unwrap());
    headers.append("set-cookie", "a=1".parse().unwrap());
    headers.append("set-cookie", "b=2".parse().unwrap());
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    let body: Vec<u8> = (0..=255u8).cycle().take(1500).collect();
    Record::new(fp, StoredResponse::new(StatusCode::CREATED, headers, Bytes::from(body), Some(trailers)))
}

async fn acquire<St: Store>(store: &St, request: ClaimRequest) -> Lease {
    match store.claim(request).await.unwrap() {
        Claim::Acquired(lease) => lease,
        other => panic!("expected to acquire, got {other:?}"),
    }
}

fn is_not_owner<T: std::fmt::Debug>(result: Result<T, StoreError>) -> bool {
    matches!(result, Err(StoreError::NotOwner))
}

pub async fn claim_then_duplicate_is_in_flight<St: Store>(store: &St) {
    let id = fresh_id();
    acquire(store, ClaimRequest::new(id, fingerprint(1), LEASE)).await;
    match store.claim(ClaimRequest::new(id, fingerprint(2), LEASE)).await.unwrap() {
        Claim::InFlight { fingerprint: fp } => assert_eq!(fp, fingerprint(1), "the holder's fingerprint"),
        // A store that compares fingerprints without reading them.
        Claim::InFlightMismatch => {}
        other => panic!("expected in flight, got {other:?}"),
    }
    match store.claim(ClaimRequest::new(id, fingerprint(1), LEASE)).await.unwrap() {
        Claim::InFlight { fingerprint: fp } => assert_eq!(fp, fingerprint(1), "the holder's fingerprint"),
        other => panic!("expected in flight with the same fingerprint, got {other:?}"),
    }
}

pub async fn race_of_64_claims_has_one_winner<St: Store + Clone>(store: &St) {
    let id = fresh_id();
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.claim(ClaimRequest::new(id, fingerprint(1), LEASE)).await })
        })
        .collect();
    let mut acquired = 0;
    for task in tasks {
        match task.await.unwrap().unwrap() {
            Claim::Acquired(_) => acquired += 1,
            Claim::InFlight { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(acquired, 1);
}

pub async fn fencing_tokens_grow_across_release_and_expiry<St: Store>(store: &St) {
    let id = fresh_id();
    let first = acquire(store, ClaimRequest::new(id, fingerprint(1), LEASE)).await;
    store.release(&id, first.owner()).await.unwrap();
    let second = acquire(store, ClaimRequest::new(id, fingerprint(1), SHORT)).await;
    assert!(second.fencing_token() > first.fencing_token());
    assert_ne!(second.owner(), first.owner());
    tokio::time::sleep(PAST_SHORT).await;
    let third = acquire(store, ClaimRequest::new(id, fingerprint(1), LEASE)).await;
    assert!(third.fencing_token() > second.fencing_token());
}

pub async fn only_the_owner_can_complete_release_or_renew<St: Store>(store: &St) {
    let id = fresh_id();
    let lease = acquire(store, ClaimRequest::new(id, fingerprint(1), LEASE)).await;
    let stranger = OwnerToken::from_u128(lease.owner().as_u128() ^ 1);
    assert!(is_not_owner(store.complete(&id, stranger, sample_record(fingerprint(1)), LEASE).await));
    assert!(is_not_owner(store.release(&id, stranger).await));
    assert!(is_not_owner(store.renew(&id, stranger, LEASE).await));
    // Nothing changed: still in flight for the real owner, who can complete.
    assert!(matches!(store.claim(ClaimRequest::new(id, fingerprint(1), LEASE)).await, Ok(Claim::InFlight { .. })));
    store.complete(&id, lease.owner(), sample_record(fingerprint(1)), LEASE).await.unwrap();
    // Once completed, the owner's token no longer releases anything.
    assert!(is_not_owner(store.release(&id, lease.owner()).await));
    assert!(matches!(store.claim(ClaimRequest::new(id, fingerprint(1), LEASE)).await, Ok(Claim::Completed(_))));
}

/// A lookup's fencing token is the holder's, where the store keeps it
/// (the Redis store leaves it to the owner: `None`).
pub fn assert_token_if_kept(seen: Option<FencingToken>, holder: FencingToken) {
    if let Some(seen) = seen {
        assert_eq!(seen, holder, "lookup reports another claim's token");
    }
}

/// A lookup's fingerprint is the holder's, where the store keeps it (the
/// transactional PostgreSQL store commits nothing in flight: `None`).
pub fn assert_fingerprint_if_kept(seen: Option<Fingerprint>, holder: Fingerprint) {
    if let Some(seen) = seen {
        assert_eq!(seen, holder, "lookup reports another claim's fingerprint");
    }
}

pub async fn stale_owner_changes_nothing_after_its_lease_ran_out<St: Store>(store: &St) {
    let id = fresh_id();
    let stale = acquire(store, ClaimRequest::new(id, fingerprint(1), SHORT)).await;
    tokio::time::sleep(PAST_SHORT).await;
    let current = acquire(store, ClaimRequest::new(id, fingerprint(2), LEASE)).await;
    assert!(current.fencing_token() > stale.fencing_token());
    assert!(is_not_owner(store.complete(&id, stale.owner(), sample_record(fingerprint(1)), LEASE).await));
    assert!(is_not_owner(store.release(&id, stale.owner()).await));
    assert!(is_not_owner(store.renew(&id, stale.owner(), LEASE).await));
    match store.lookup(&id).await.unwrap() {
        Some(RecordState::InFlight { fingerprint: fp, fencing_token }) => {
            assert_fingerprint_if_kept(fp, fingerprint(2));
            assert_token_if_kept(fencing_token, current.fencing_token());
        }
        other => panic!("the second owner's claim must stand, got {other:?}"),
    }
}

pub async fn renew_extends_the_lease<St: Store>(store: &St) {
    let id = fresh_id();
    let lease = acquire(store, ClaimRequest::new(id, fingerprint(1), SHORT)).await;
    store.renew(&id, lease.owner(), LEASE).await.unwrap();
    tokio::time::sleep(PAST_SHORT).await;
    assert!(matches!(store.claim(ClaimRequest::new(id, fingerprint(1), LEASE)).await, Ok(Claim::InFlight { .. })));
    store.release(&id, lease.owner()).await.unwrap();
}

pub async fn completed_record_is_returned_byte_for_byte<St: Store>(store: &St) {
    let id = fresh_id();
    let lease = acquire(store, ClaimRequest::new(id, fingerprint(1), LEASE)).await;
    let record = sample_record(fingerprint(1));
    store.complete(&id, lease.owner(), record.clone(), LEASE).await.unwrap();
    match store.claim(ClaimRequest::new(id, fingerprint(9), LEASE)).await.unwrap() {
        Claim::Completed(stored) => assert_eq!(stored, record),
        other => panic!("expected completed, got {other:?}"),
    }
}

pub async fn retention_expires_completed_records<St: Store>(store: &St) {
    let id = fresh_id();
    let lease = acquire(store, ClaimRequest::new(id, fingerprint(1), LEASE)).await;
    store.complete(&id, lease.owner(), sample_record(fingerprint(1)), SHORT).await.unwrap();
    assert!(matches!(store.lookup(&id).await.unwrap(), Some(RecordState::Completed(_))));
    tokio::time::sleep(PAST_SHORT).await;
    assert!(store.lookup(&id).await.unwrap().is_none());
    let again = acquire(store, ClaimRequest::new(id, fingerprint(1), LEASE)).await;
    assert!(again.fencing_token() > lease.fencing_token());
}

pub async fn lookup_reports_each_state<St: Store>(store: &St) {
    let id = fresh_id();
    assert!(store.lookup(&id).await.unwrap().is_none());
    let lease = acquire(store, ClaimRequest::new(id, fingerprint(3), LEASE)).await;
    match store.lookup(&id).await.unwrap() {
        Some(RecordState::InFlight { fingerprint: fp, fencing_token }) => {
            assert_fingerprint_if_kept(fp, fingerprint(3));
            assert_token_if_kept(fencing_token, lease.fencing_token());
        }
        other => panic!("expected in flight, got {other:?}"),
    }
    let record = sample_record(fingerprint(3));
    store.complete(&id, lease.owner(), record.clone(), LEASE).await.unwrap();
    match store.lookup(&id).await.unwrap() {
        Some(RecordState::Completed(stored)) => assert_eq!(stored, record),
        other => panic!("expected completed, got {other:?}"),
    }
}

pub async fn replace_completed_takes_over_a_finished_record<St: Store>(store: &St) {
    let id = fresh_id();
    let first = acquire(store, ClaimRequest::new(id, fingerprint(1), LEASE)).await;
    store.complete(&id, first.owner(), sample_record(fingerprint(1)), LEASE).await.unwrap();
    let second = acquire(store, ClaimRequest::new(id, fingerprint(2), LEASE).with_replace_completed(true)).await;
    assert!(second.fencing_token() > first.fencing_token());
    // An in-flight record is never taken over.
    let third = store.claim(ClaimRequest::new(id, fingerprint(2), LEASE).with_replace_completed(true)).await;
    assert!(matches!(third, Ok(Claim::InFlight { .. })));
}

pub async fn wait_wakes_when_the_record_completes<St: Store + Clone>(store: &St) {
    let id = fresh_id();
    let lease = acquire(store, ClaimRequest::new(id, fingerprint(1), LEASE)).await;
    let waiter = {
        let store = store.clone();
        let request = ClaimRequest::new(id, fingerprint(1), LEASE);
        tokio::spawn(async move { store.wait(&request, Duration::from_secs(60)).await })
    };
    store.complete(&id, lease.owner(), sample_record(fingerprint(1)), LEASE).await.unwrap();
    // A waiter that is never woken would sit out its 60 s.
    let waited = tokio::time::timeout(Duration::from_secs(10), waiter).await.expect("the waiter was not woken");
    waited.unwrap().unwrap();
    assert!(matches!(store.claim(ClaimRequest::new(id, fingerprint(1), LEASE)).await, Ok(Claim::Completed(_))));
}

pub async fn wait_returns_at_once_for_a_finished_record<St: Store>(store: &St) {
    let id = fresh_id();
    let lease = acquire(store, ClaimRequest::new(id, fingerprint(1), LEASE)).await;
    store.complete(&id, lease.owner(), sample_record(fingerprint(1)), LEASE).await.unwrap();
    let request = ClaimRequest::new(id, fingerprint(1), LEASE);
    tokio::time::timeout(Duration::from_secs(10), store.wait(&request, Duration::from_secs(60)))
        .await
        .expect("waiting on a finished record must not block")
        .unwrap();
}

pub async fn records_are_independent<St: Store>(store: &St) {
    let (a, b) = (fresh_id(), fresh_id());
    let lease = acquire(store, ClaimRequest::new(a, fingerprint(1), LEASE)).await;
    acquire(store, ClaimRequest::new(b, fingerprint(1), LEASE)).await;
    store.release(&a, lease.owner()).await.unwrap();
    assert!(store.lookup(&a).await.unwrap().is_none());
    assert!(matches!(store.lookup(&b).await.unwrap(), Some(RecordState::InFlight { .. })));
}
