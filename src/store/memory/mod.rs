//! The built-in in-memory store.

mod expiries;
mod table;

use std::{sync::Arc, time::Duration};

use self::table::{ENTRY_OVERHEAD, IN_FLIGHT_SIZE, Inner};
use super::{Claim, ClaimRequest, OwnerToken, RecordState, Store, StoreError};
use crate::{Metrics, Record, RecordId};

/// A bounded in-memory store, for one process.
///
/// - Bounded by entries and bytes (default 100,000 and 64 MiB). When full it
///   makes room by dropping completed records, those closest to expiry
///   first, a thirty-second of its limits at a time; it never drops an
///   in-flight record. Only when everything it holds is in flight does it
///   refuse a claim ([`StoreError::Full`]: 503 by default). Drops are
///   counted as [`crate::Outcome::Evicted`] and logged at `warn`, once per
///   pass.
/// - A dropped record is forgotten: a retry of its key, after the drop,
///   runs the request again. Size the store so that records outlive the
///   window in which clients retry: at least (requests per second) x
///   (retry window) entries, and that many times (response size + 160 B)
///   bytes. A store that drops records often under normal load is too
///   small; watch the `evicted` counter.
/// - Leases and retention are honoured: an expired record is gone for every
///   call, and its memory is reclaimed as calls pass by.
/// - Sharded 64 ways with one short lock each; no global lock. Fencing
///   tokens come from a counter per shard: a key always lands in the same
///   shard, so its tokens grow with every claim, as on Redis (a counter per
///   hash slot); tokens of different keys are not ordered.
/// - Compact: a completed record is kept as its encoded bytes beside a
///   56-byte entry and a 16-byte expiry slot (see BENCHMARKS.md for the heap
///   it takes per record). Records up to 4 KiB are copied for each replay,
///   larger ones shared.
/// - Waiters for an in-flight record are woken when it completes or is
///   released, without polling.
///
/// Cloning shares the same records.
///
/// # Example
/// ```
/// use tower_idempotency::{IdempotencyLayer, store::MemoryStore};
///
/// let store = MemoryStore::with_limits(10_000, 64 << 20);
/// let layer = IdempotencyLayer::new(store.clone());
/// assert_eq!(store.len(), 0);
/// # drop(layer);
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// A store of at most 100,000 records and 64 MiB.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::store::MemoryStore;
    /// assert!(MemoryStore::new().is_empty());
    /// ```
    pub fn new() -> Self {
        Self::with_limits(100_000, 64 << 20)
    }

    /// A store of at most `max_entries` records and `max_bytes` bytes of
    /// records (each record counts its encoded size plus 160 bytes).
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::store::MemoryStore;
    /// let store = MemoryStore::with_limits(1_000_000, 1 << 30);
    /// # drop(store);
    /// ```
    pub fn with_limits(max_entries: usize, max_bytes: usize) -> Self {
        Self { inner: Arc::new(Inner::new(max_entries, max_bytes)) }
    }

    /// How many records the store holds, expired ones not yet reclaimed
    /// included.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::store::MemoryStore;
    /// assert_eq!(MemoryStore::new().len(), 0);
    /// ```
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    /// Whether the store holds no record.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::store::MemoryStore;
    /// assert!(MemoryStore::new().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes counted against the byte limit.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::store::MemoryStore;
    /// assert_eq!(MemoryStore::new().bytes(), 0);
    /// ```
    pub fn bytes(&self) -> usize {
        self.inner.bytes()
    }
}

impl Store for MemoryStore {
    async fn claim(&self, request: ClaimRequest) -> Result<Claim, StoreError> {
        if let Some(claim) = self.inner.try_claim(&request) {
            return claim;
        }
        self.inner.make_room(true, IN_FLIGHT_SIZE);
        self.inner.try_claim(&request).unwrap_or(Err(StoreError::Full))
    }

    async fn complete(
        &self,
        id: &RecordId,
        owner: OwnerToken,
        record: Record,
        retention: Duration,
    ) -> Result<(), StoreError> {
        let Err(record) = self.inner.complete(id, owner, record, retention)? else { return Ok(()) };
        self.inner.make_room(false, ENTRY_OVERHEAD + record.encoded_len());
        self.inner.complete(id, owner, record, retention)?.map_err(|_| StoreError::Full)
    }

    async fn release(&self, id: &RecordId, owner: OwnerToken) -> Result<(), StoreError> {
        self.inner.release(id, owner)
    }

    async fn renew(&self, id: &RecordId, owner: OwnerToken, lease: Duration) -> Result<(), StoreError> {
        self.inner.renew(id, owner, lease)
    }

    async fn lookup(&self, id: &RecordId) -> Result<Option<RecordState>, StoreError> {
        Ok(self.inner.lookup(id))
    }

    fn report_to(&self, metrics: &Metrics) {
        self.inner.report_to(metrics);
    }

    async fn wait(&self, request: &ClaimRequest, timeout: Duration) -> Result<(), StoreError> {
        let Some((notified, deadline)) = self.inner.wake_on_settle(&request.id(), timeout) else { return Ok(()) };
        match deadline {
            Some(deadline) => drop(tokio::time::timeout_at(deadline, notified).await),
            None => drop(tokio::time::timeout(timeout, notified).await),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{table::Entry, *};
    use crate::Fingerprint;

    fn request(id: u8) -> ClaimRequest {
        ClaimRequest::new(RecordId::from_bytes([id; 32]), Fingerprint::from_bytes([0; 32]), Duration::from_secs(30))
    }

    fn record(body: usize) -> Record {
        let response = crate::StoredResponse::new(http::StatusCode::OK, Default::default(), vec![0; body].into(), None);
        Record::new(Fingerprint::from_bytes([0; 32]), response)
    }

    #[tokio::test]
    async fn full_store_refuses_new_claims_but_keeps_serving_existing_ones() {
        let store = MemoryStore::with_limits(2, usize::MAX);
        assert!(matches!(store.claim(request(1)).await, Ok(Claim::Acquired(_))));
        assert!(matches!(store.claim(request(2)).await, Ok(Claim::Acquired(_))));
        assert!(matches!(store.claim(request(3)).await, Err(StoreError::Full)));
        assert!(matches!(store.claim(request(1)).await, Ok(Claim::InFlight { .. })));
        assert_eq!(store.len(), 2);
    }

    #[tokio::test]
    async fn byte_limit_refuses_a_record_that_does_not_fit() {
        let store = MemoryStore::with_limits(10, IN_FLIGHT_SIZE + 1000);
        let Ok(Claim::Acquired(lease)) = store.claim(request(1)).await else { panic!() };
        let id = request(1).id();
        let huge = store.complete(&id, lease.owner(), record(4000), Duration::from_secs(60)).await;
        assert!(matches!(huge, Err(StoreError::Full)));
        // A "not stored" marker always fits in the room the claim took.
        let marker = Record::not_stored(Fingerprint::from_bytes([0; 32]), crate::NotStored::StoreFull);
        assert!(ENTRY_OVERHEAD + marker.encoded_len() <= IN_FLIGHT_SIZE);
        store.complete(&id, lease.owner(), record(500), Duration::from_secs(60)).await.unwrap();
        assert_eq!(store.bytes(), ENTRY_OVERHEAD + record(500).encoded_len());
    }

    #[tokio::test]
    async fn a_record_that_cannot_fit_drops_nothing_in_vain() {
        let store = MemoryStore::with_limits(10, 3 * IN_FLIGHT_SIZE + 1_500);
        let Ok(Claim::Acquired(first)) = store.claim(request(1)).await else { panic!() };
        store.complete(&request(1).id(), first.owner(), record(500), Duration::from_secs(60)).await.unwrap();
        let Ok(Claim::Acquired(second)) = store.claim(request(2)).await else { panic!() };
        let huge = store.complete(&request(2).id(), second.owner(), record(10_000), Duration::from_secs(60)).await;
        assert!(matches!(huge, Err(StoreError::Full)));
        assert!(
            matches!(store.claim(request(1)).await, Ok(Claim::Completed(_))),
            "a record that could never fit must not cost the others their place"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn expired_records_free_their_room() {
        let store = MemoryStore::with_limits(1, usize::MAX);
        assert!(matches!(store.claim(request(1)).await, Ok(Claim::Acquired(_))));
        assert!(matches!(store.claim(request(2)).await, Err(StoreError::Full)));
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(matches!(store.claim(request(2)).await, Ok(Claim::Acquired(_))));
        assert_eq!((store.len(), store.bytes()), (1, IN_FLIGHT_SIZE));
    }

    #[test]
    fn an_entry_is_56_bytes_besides_its_record() {
        assert!(size_of::<Entry>() <= 56, "{} bytes", size_of::<Entry>());
    }

    /// Whether the store holds no live record once the expired ones due are
    /// reclaimed. (A claim is no probe: a full store drops a completed
    /// record to make room.)
    fn room_is_free(store: &MemoryStore) -> bool {
        store.inner.purge_all();
        store.is_empty()
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_kept_past_its_lease_is_reclaimed_when_its_retention_ends() {
        let store = MemoryStore::with_limits(1, usize::MAX);
        let Ok(Claim::Acquired(lease)) = store.claim(request(1)).await else { panic!() };
        store.complete(&request(1).id(), lease.owner(), record(10), Duration::from_secs(60)).await.unwrap();
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(!room_is_free(&store), "reclaimed at its lease's end");
        assert!(matches!(store.claim(request(1)).await, Ok(Claim::Completed(_))));
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(room_is_free(&store));
        assert_eq!(store.bytes(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retention_shorter_than_the_lease_frees_the_room_at_its_end() {
        let store = MemoryStore::with_limits(1, usize::MAX);
        let Ok(Claim::Acquired(lease)) = store.claim(request(1)).await else { panic!() };
        store.complete(&request(1).id(), lease.owner(), record(10), Duration::from_secs(1)).await.unwrap();
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(!room_is_free(&store));
        tokio::time::advance(Duration::from_millis(2)).await;
        assert!(room_is_free(&store));
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewed_claim_keeps_its_room_until_the_renewal_ends() {
        let store = MemoryStore::with_limits(1, usize::MAX);
        let Ok(Claim::Acquired(lease)) = store.claim(request(1)).await else { panic!() };
        tokio::time::advance(Duration::from_secs(20)).await;
        store.renew(&request(1).id(), lease.owner(), Duration::from_secs(30)).await.unwrap();
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!room_is_free(&store));
        assert!(matches!(store.claim(request(1)).await, Ok(Claim::InFlight { .. })));
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(room_is_free(&store));
    }

    #[tokio::test(start_paused = true)]
    async fn a_completed_record_claimed_again_to_rerun_expires_with_its_new_lease() {
        let store = MemoryStore::with_limits(1, usize::MAX);
        let Ok(Claim::Acquired(lease)) = store.claim(request(1)).await else { panic!() };
        store.complete(&request(1).id(), lease.owner(), record(10), Duration::from_secs(3600)).await.unwrap();
        let rerun = request(1).with_replace_completed(true);
        assert!(matches!(store.claim(rerun).await, Ok(Claim::Acquired(_))));
        assert_eq!(store.bytes(), IN_FLIGHT_SIZE);
        // The rerun is abandoned: its lease, not the old retention, ends it.
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(room_is_free(&store));
    }
}
