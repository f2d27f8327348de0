//! The built-in in-memory store.

mod expiries;
mod table;

use std::{sync::Arc, time::Duration};

use self::table::{IN_FLIGHT_SIZE, Inner};

/// Passes a claim may make for room before it is refused: a pass reserves
/// what it frees for its claim, so one is enough unless a `Rerun` take-over
/// raced it.
const ROOM_PASSES: usize = 4;
use super::{Claim, ClaimRequest, OwnerToken, RecordState, Store, StoreError};
use crate::{Metrics, Record, RecordId};

/// A bounded in-memory store, for one process.
///
/// - Bounded by entries and bytes (default 100,000 and 64 MiB). When full it
///   makes room by dropping completed records, a thirty-second of the limit
///   hit at a time, fairly between scopes (callers): the scope that holds
///   the most (records or bytes, whichever limit was hit) gives way first,
///   its records closest to expiry first, so a caller that floods the store
///   evicts its own records, not another's. It never drops an in-flight
///   record. Only when everything it holds is in flight does it refuse a
///   claim ([`StoreError::Full`]: 503 by default). Drops are counted as
///   [`crate::Outcome::Evicted`] and per [`crate::EvictionReason`], and
///   logged once per pass that drops any (at `warn` when the store is full,
///   at `info` for a scope at its cap). [`MemoryStore::with_scope_limit`]
///   caps each scope as well. Fairness costs a claim nothing measurable
///   (claim and complete within 3% of before on the components bench:
///   BENCHMARKS.md, "Memory store: fair eviction between scopes").
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
///   64-byte entry (its scope tag included) and a 16-byte expiry slot (see BENCHMARKS.md for the heap
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
        Self { inner: Arc::new(Inner::new(max_entries, max_bytes, None)) }
    }

    /// Caps what one scope (one caller) may hold: at most `max_entries`
    /// records and `max_bytes` bytes, counted as the store counts them. A
    /// scope at its cap makes room by dropping its own completed records,
    /// closest to expiry first (counted as
    /// [`EvictionReason::ScopeLimit`](crate::EvictionReason::ScopeLimit));
    /// a scope whose share is all in flight is refused new claims (503
    /// `store-full`), and only it; a completion of that scope that needs
    /// more room than its claim held is then not stored (410 to its
    /// retries). Caps below one claim's room are raised
    /// to it.
    ///
    /// Without a cap the store is still fair when full: the scope holding
    /// the most gives way first. The cap costs each claim and completion
    /// one more short lock (on the scope's share), taken only when set.
    ///
    /// A builder step: it returns a new, empty store with this store's
    /// limits and the cap, so call it before the store is shared.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::store::MemoryStore;
    /// // One caller may hold a tenth of the store.
    /// let store = MemoryStore::with_limits(100_000, 64 << 20).with_scope_limit(10_000, 6 << 20);
    /// assert!(store.is_empty());
    /// ```
    #[must_use]
    pub fn with_scope_limit(self, max_entries: usize, max_bytes: usize) -> Self {
        let (store_entries, store_bytes) = self.inner.limits();
        let cap = (max_entries.max(1), max_bytes.max(IN_FLIGHT_SIZE));
        Self { inner: Arc::new(Inner::new(store_entries, store_bytes, Some(cap))) }
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
        let mut need = match self.inner.try_claim(&request, None) {
            Ok(claim) => return claim,
            Err(need) => need,
        };
        for _ in 0..ROOM_PASSES {
            if !self.inner.make_room(need) {
                return Err(StoreError::Full);
            }
            match self.inner.try_claim(&request, Some(need)) {
                Ok(claim) => return claim,
                Err(still) => need = still,
            }
        }
        Err(StoreError::Full)
    }

    async fn complete(
        &self,
        id: &RecordId,
        owner: OwnerToken,
        record: Record,
        retention: Duration,
    ) -> Result<(), StoreError> {
        // `need`: what the record needs beyond the room its claim holds.
        let Err((record, need)) = self.inner.complete(id, owner, record, retention, 0)? else { return Ok(()) };
        if !self.inner.make_room(need) {
            return Err(StoreError::Full);
        }
        let completed = self.inner.complete(id, owner, record, retention, need.bytes);
        if !matches!(completed, Ok(Ok(()))) {
            self.inner.unreserve(need.scope, false, need.bytes);
        }
        completed?.map_err(|_| StoreError::Full)
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
    use super::{
        table::{ENTRY_OVERHEAD, Entry},
        *,
    };
    use crate::Fingerprint;

    fn request(id: u8) -> ClaimRequest {
        ClaimRequest::new(RecordId::from_bytes([id; 32]), Fingerprint::from_bytes([0; 32]), Duration::from_secs(30))
    }

    fn record(body: usize) -> Record {
        let response = crate::StoredResponse::new(http::StatusCode::OK, Default::default(), vec![0; body].into(), None);
        Record::new(Fingerprint::from_bytes([0; 32]), response)
    }

    /// A claim of key `n` by the caller `scope`.
    fn scoped(n: u16, scope: &str) -> ClaimRequest {
        let mut bytes = [0; 32];
        bytes[..2].copy_from_slice(&n.to_le_bytes());
        bytes[2..2 + scope.len().min(30)].copy_from_slice(&scope.as_bytes()[..scope.len().min(30)]);
        ClaimRequest::new(RecordId::from_bytes(bytes), Fingerprint::from_bytes([0; 32]), Duration::from_secs(30))
            .with_scope(&crate::Scope::new(scope.to_owned()))
    }

    /// Claims and completes `request` with a body of `body` bytes.
    async fn keep(store: &MemoryStore, request: ClaimRequest, body: usize) {
        let Ok(Claim::Acquired(lease)) = store.claim(request).await else { panic!("not claimed") };
        store.complete(&request.id(), lease.owner(), record(body), Duration::from_secs(3600)).await.unwrap();
    }

    async fn kept(store: &MemoryStore, request: ClaimRequest) -> bool {
        matches!(store.lookup(&request.id()).await, Ok(Some(RecordState::Completed(_))))
    }

    #[tokio::test]
    async fn a_caller_that_fills_the_entries_evicts_its_own_records_not_anothers() {
        let store = MemoryStore::with_limits(64, usize::MAX);
        let metrics = Metrics::default();
        store.report_to(&metrics);
        for n in 0..10 {
            keep(&store, scoped(n, "victim"), 10).await;
        }
        for n in 0..200 {
            keep(&store, scoped(n, "flooder"), 10).await;
        }
        for n in 0..10 {
            assert!(kept(&store, scoped(n, "victim")).await, "the victim's record {n} was evicted");
        }
        assert!(kept(&store, scoped(199, "flooder")).await);
        assert!(store.len() <= 64);
        assert!(metrics.evictions(crate::EvictionReason::StoreFull) >= 146);
        assert_eq!(metrics.evictions(crate::EvictionReason::ScopeLimit), 0);
    }

    #[tokio::test]
    async fn a_caller_that_fills_the_bytes_evicts_its_own_records_not_anothers() {
        let store = MemoryStore::with_limits(10_000, 256 << 10);
        keep(&store, scoped(0, "victim"), 100).await;
        keep(&store, scoped(1, "victim"), 20_000).await;
        // 68 large responses, as the flood that filled the default store.
        for n in 0..68 {
            keep(&store, scoped(n, "flooder"), 16 << 10).await;
        }
        assert!(kept(&store, scoped(0, "victim")).await);
        assert!(kept(&store, scoped(1, "victim")).await);
        assert!(store.bytes() <= 256 << 10);
    }

    #[tokio::test]
    async fn when_full_the_scope_holding_the_most_gives_way_first() {
        let store = MemoryStore::with_limits(64, usize::MAX);
        for n in 0..20 {
            keep(&store, scoped(n, "small"), 10).await;
        }
        for n in 0..44 {
            keep(&store, scoped(n, "large"), 10).await;
        }
        keep(&store, scoped(0, "new"), 10).await;
        for n in 0..20 {
            assert!(kept(&store, scoped(n, "small")).await, "the smaller scope lost record {n}");
        }
        assert!(!kept(&store, scoped(0, "large")).await, "the larger scope's oldest record goes first");
    }

    #[tokio::test]
    async fn a_scope_limit_caps_each_caller_and_counts_its_evictions() {
        let store = MemoryStore::with_limits(1_000, usize::MAX).with_scope_limit(10, usize::MAX);
        let metrics = Metrics::default();
        store.report_to(&metrics);
        keep(&store, scoped(0, "quiet"), 10).await;
        for n in 0..25 {
            keep(&store, scoped(n, "busy"), 10).await;
        }
        let busy = futures_util::future::join_all((0..25).map(|n| kept(&store, scoped(n, "busy")))).await;
        assert!(busy.iter().filter(|&&kept| kept).count() <= 10, "{busy:?}");
        assert!(busy[24], "the newest record stays");
        assert!(kept(&store, scoped(0, "quiet")).await);
        assert!(metrics.evictions(crate::EvictionReason::ScopeLimit) >= 15);
        assert_eq!(metrics.evictions(crate::EvictionReason::StoreFull), 0);
    }

    #[tokio::test]
    async fn a_scope_at_its_limit_with_everything_in_flight_is_refused_alone() {
        let store = MemoryStore::with_limits(1_000, usize::MAX).with_scope_limit(2, usize::MAX);
        assert!(matches!(store.claim(scoped(0, "busy")).await, Ok(Claim::Acquired(_))));
        assert!(matches!(store.claim(scoped(1, "busy")).await, Ok(Claim::Acquired(_))));
        assert!(matches!(store.claim(scoped(2, "busy")).await, Err(StoreError::Full)));
        assert!(matches!(store.claim(scoped(0, "other")).await, Ok(Claim::Acquired(_))));
    }

    #[tokio::test]
    async fn a_rerun_take_over_of_a_small_record_stays_within_the_byte_limit() {
        let small = ENTRY_OVERHEAD + record(0).encoded_len();
        assert!(small < IN_FLIGHT_SIZE, "a take-over must grow the entry for this test to show anything");
        let store = MemoryStore::with_limits(100, small + IN_FLIGHT_SIZE);
        keep(&store, scoped(0, "a"), 0).await;
        assert!(matches!(store.claim(scoped(1, "a")).await, Ok(Claim::Acquired(_))));
        // Two claims' room does not fit: the take-over is refused, and
        // refused without dropping the record it would have replaced.
        let rerun = scoped(0, "a").with_replace_completed(true);
        assert!(matches!(store.claim(rerun).await, Err(StoreError::Full)));
        assert!(store.bytes() <= small + IN_FLIGHT_SIZE, "{} bytes", store.bytes());
        assert!(kept(&store, scoped(0, "a")).await);
    }

    #[tokio::test]
    async fn a_completion_that_needs_a_little_room_drops_a_little() {
        let size = ENTRY_OVERHEAD + record(100).encoded_len();
        let store = MemoryStore::with_limits(3_200, 21 * size);
        for n in 0..20 {
            keep(&store, scoped(n, "a"), 100).await;
        }
        // Completing with 100 more bytes than there is room for.
        keep(&store, scoped(20, "a"), 200).await;
        let left = futures_util::future::join_all((0..20).map(|n| kept(&store, scoped(n, "a")))).await;
        assert!(left.iter().filter(|&&kept| kept).count() >= 17, "{left:?}");
    }

    #[test]
    fn a_burst_of_claims_on_a_full_store_is_never_refused_while_completed_records_remain() {
        const THREADS: usize = 64;
        let store = MemoryStore::with_limits(THREADS, usize::MAX);
        let key = |round: usize, thread: usize| {
            let mut bytes = [7; 32];
            bytes[..8].copy_from_slice(&(round as u64).to_le_bytes());
            bytes[8..16].copy_from_slice(&(thread as u64).to_le_bytes());
            ClaimRequest::new(RecordId::from_bytes(bytes), Fingerprint::from_bytes([0; 32]), Duration::from_secs(30))
        };
        fn now<T>(future: impl std::future::Future<Output = T>) -> T {
            futures_util::FutureExt::now_or_never(std::pin::pin!(future)).expect("the memory store never waits")
        }
        let barrier = std::sync::Barrier::new(THREADS);
        let refused = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|threads| {
            for thread in 0..THREADS {
                let (store, barrier, refused) = (&store, &barrier, &refused);
                threads.spawn(move || {
                    // Released at once; from then on each thread claims and
                    // completes fresh keys, as fast as it can.
                    barrier.wait();
                    for round in 0..1_000 {
                        let request = key(round, thread);
                        match now(store.claim(request)) {
                            Ok(Claim::Acquired(lease)) => {
                                let id = request.id();
                                now(store.complete(&id, lease.owner(), record(10), Duration::from_secs(60))).unwrap();
                            }
                            Err(StoreError::Full) => drop(refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed)),
                            _ => panic!("a fresh key was not claimed"),
                        }
                    }
                });
            }
        });
        assert_eq!(refused.into_inner(), 0, "claims refused while completed records remained");
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
    fn an_entry_is_64_bytes_besides_its_record() {
        assert!(size_of::<Entry>() <= 64, "{} bytes", size_of::<Entry>());
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
