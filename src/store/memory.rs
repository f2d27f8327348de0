//! The built-in in-memory store.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, hash_map::RandomState},
    hash::{BuildHasher, Hasher},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

use super::{Claim, ClaimRequest, Lease, OwnerToken, RecordState, Store, StoreError};
use crate::{FencingToken, Fingerprint, Record, RecordId};

const SHARDS: usize = 64;
/// Bytes counted for an entry besides its record: the id, the entry and its
/// expiry slot.
const ENTRY_OVERHEAD: usize = 160;
/// Bytes counted for an in-flight entry: enough that completing it with a
/// "not stored" record never needs more room, so that completion cannot be
/// refused by a full store.
const IN_FLIGHT_SIZE: usize = ENTRY_OVERHEAD + 64;
/// Expired entries removed per call, so no call pays for a large backlog.
const PURGE_PER_CALL: usize = 32;

/// A bounded in-memory store, for one process.
///
/// - Bounded by entries and bytes. When full it refuses new claims with
///   [`StoreError::Full`], which the layer answers like an unavailable store
///   (503 by default); it never evicts a record early, in flight or completed.
/// - Leases and retention are honoured: an expired record is gone for every
///   call, and its memory is reclaimed as calls pass by.
/// - Sharded 64 ways with one short lock each; no global lock.
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

struct Inner {
    shards: Box<[Mutex<Shard>]>,
    hasher: IdHashing,
    entries: AtomicUsize,
    bytes: AtomicUsize,
    max_entries: usize,
    max_bytes: usize,
    fencing: AtomicU64,
    owner_seed: u64,
}

struct Shard {
    map: HashMap<RecordId, Entry, IdHashing>,
    expiries: BinaryHeap<Reverse<(Instant, RecordId)>>,
}

struct Entry {
    state: State,
    expires_at: Instant,
    size: usize,
    waiters: Option<Arc<Notify>>,
}

enum State {
    InFlight { owner: OwnerToken, fencing_token: FencingToken, fingerprint: Fingerprint },
    Completed(Record),
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// A store of at most 100,000 records and 256 MiB.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::store::MemoryStore;
    /// assert!(MemoryStore::new().is_empty());
    /// ```
    pub fn new() -> Self {
        Self::with_limits(100_000, 256 << 20)
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
        let random = RandomState::new();
        let owner_seed = random.hash_one(0u8);
        let hasher = IdHashing { seeds: [random.hash_one(1u8), random.hash_one(2u8) | 1] };
        Self {
            inner: Arc::new(Inner {
                shards: (0..SHARDS)
                    .map(|_| {
                        Mutex::new(Shard { map: HashMap::with_hasher(hasher.clone()), expiries: BinaryHeap::new() })
                    })
                    .collect(),
                hasher,
                entries: AtomicUsize::new(0),
                bytes: AtomicUsize::new(0),
                max_entries,
                max_bytes,
                fencing: AtomicU64::new(0),
                owner_seed,
            }),
        }
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
        self.inner.entries.load(Ordering::Relaxed)
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
        self.inner.bytes.load(Ordering::Relaxed)
    }
}

/// Hashes record ids, for the shards and their maps. Ids are SHA-256
/// digests, uniform already; folding their bits with two secret seeds
/// (multiplications, as `foldhash` does) keeps a client, who can compute
/// the ids of its keys, from aiming many keys at one bucket, for a fraction
/// of SipHash's cost.
#[derive(Clone)]
struct IdHashing {
    seeds: [u64; 2],
}

impl BuildHasher for IdHashing {
    type Hasher = IdHasher;

    fn build_hasher(&self) -> IdHasher {
        IdHasher { seeds: self.seeds, hash: 0 }
    }
}

struct IdHasher {
    seeds: [u64; 2],
    hash: u64,
}

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(16) {
            let mut words = [0u8; 16];
            words[..chunk.len()].copy_from_slice(chunk);
            let low =
                u64::from_le_bytes([words[0], words[1], words[2], words[3], words[4], words[5], words[6], words[7]]);
            let high = u64::from_le_bytes([
                words[8], words[9], words[10], words[11], words[12], words[13], words[14], words[15],
            ]);
            let product = u128::from(low ^ self.hash ^ self.seeds[0]) * u128::from(high ^ self.seeds[1]);
            self.hash = (product as u64) ^ ((product >> 64) as u64);
        }
    }

    fn finish(&self) -> u64 {
        self.hash
    }
}

impl Inner {
    fn shard(&self, id: &RecordId) -> MutexGuard<'_, Shard> {
        // Bits the shard's map uses neither for its buckets (the low ones)
        // nor for its tags (the top seven).
        let index = ((self.hasher.hash_one(id) >> 32) as usize) % SHARDS;
        // A panic while a shard was locked cannot leave an entry half
        // written (every update is one assignment), so poison is ignored.
        self.shards[index].lock().unwrap_or_else(|poison| poison.into_inner())
    }

    fn purge(&self, shard: &mut Shard, now: Instant, limit: usize) {
        for _ in 0..limit {
            match shard.expiries.peek() {
                Some(Reverse((at, _))) if *at <= now => {}
                _ => return,
            }
            let Some(Reverse((_, id))) = shard.expiries.pop() else { return };
            if shard.map.get(&id).is_some_and(|entry| entry.expires_at <= now) {
                self.remove(shard, &id);
            }
        }
    }

    fn purge_all(&self) {
        let now = Instant::now();
        for shard in &*self.shards {
            let mut shard = shard.lock().unwrap_or_else(|poison| poison.into_inner());
            self.purge(&mut shard, now, usize::MAX);
        }
    }

    fn remove(&self, shard: &mut Shard, id: &RecordId) {
        if let Some(entry) = shard.map.remove(id) {
            self.entries.fetch_sub(1, Ordering::Relaxed);
            self.bytes.fetch_sub(entry.size, Ordering::Relaxed);
            if let Some(waiters) = entry.waiters {
                waiters.notify_waiters();
            }
        }
    }

    /// Reserves room for `delta` more bytes, or refuses.
    fn reserve_bytes(&self, delta: usize) -> bool {
        self.bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bytes| {
                bytes.checked_add(delta).filter(|&total| total <= self.max_bytes)
            })
            .is_ok()
    }

    fn reserve_entry(&self) -> bool {
        let reserved = self
            .entries
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < self.max_entries).then_some(n + 1))
            .is_ok();
        if reserved && !self.reserve_bytes(IN_FLIGHT_SIZE) {
            self.entries.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        reserved
    }

    fn new_lease(&self) -> Lease {
        let fencing = self.fencing.fetch_add(1, Ordering::Relaxed) + 1;
        let owner = (u128::from(self.owner_seed) << 64) | u128::from(fencing);
        Lease::new(OwnerToken::from_u128(owner), FencingToken::new(fencing))
    }

    /// Runs `f` on the live entry owned by `owner`, or reports `NotOwner`.
    fn with_owned<T>(
        &self,
        id: &RecordId,
        owner: OwnerToken,
        f: impl FnOnce(&Self, &mut Shard, Instant) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let now = Instant::now();
        let mut shard = self.shard(id);
        self.purge(&mut shard, now, PURGE_PER_CALL);
        match shard.map.get(id) {
            Some(Entry { state: State::InFlight { owner: current, .. }, expires_at, .. })
                if *current == owner && *expires_at > now =>
            {
                f(self, &mut shard, now)
            }
            _ => Err(StoreError::NotOwner),
        }
    }

    fn try_claim(&self, request: &ClaimRequest) -> Option<Result<Claim, StoreError>> {
        let now = Instant::now();
        let id = request.id();
        let mut guard = self.shard(&id);
        let shard = &mut *guard;
        self.purge(shard, now, PURGE_PER_CALL);
        let in_flight = |lease: Lease| State::InFlight {
            owner: lease.owner(),
            fencing_token: lease.fencing_token(),
            fingerprint: request.fingerprint(),
        };
        match shard.map.get_mut(&id) {
            Some(entry) if entry.expires_at > now => match &entry.state {
                State::InFlight { fingerprint, .. } => Some(Ok(Claim::InFlight { fingerprint: *fingerprint })),
                State::Completed(record) if !request.replace_completed() => Some(Ok(Claim::Completed(record.clone()))),
                State::Completed(_) => {
                    let lease = self.new_lease();
                    if entry.size > IN_FLIGHT_SIZE {
                        self.bytes.fetch_sub(entry.size - IN_FLIGHT_SIZE, Ordering::Relaxed);
                    } else {
                        self.bytes.fetch_add(IN_FLIGHT_SIZE - entry.size, Ordering::Relaxed);
                    }
                    entry.size = IN_FLIGHT_SIZE;
                    entry.state = in_flight(lease);
                    entry.expires_at = now + request.lease();
                    shard.expiries.push(Reverse((entry.expires_at, id)));
                    Some(Ok(Claim::Acquired(lease)))
                }
            },
            _ => {
                self.remove(shard, &id);
                if !self.reserve_entry() {
                    // Let the caller reclaim expired records without holding
                    // this shard's lock, then try once more.
                    return None;
                }
                let lease = self.new_lease();
                let expires_at = now + request.lease();
                shard
                    .map
                    .insert(id, Entry { state: in_flight(lease), expires_at, size: IN_FLIGHT_SIZE, waiters: None });
                shard.expiries.push(Reverse((expires_at, id)));
                Some(Ok(Claim::Acquired(lease)))
            }
        }
    }
}

impl Store for MemoryStore {
    async fn claim(&self, request: ClaimRequest) -> Result<Claim, StoreError> {
        if let Some(claim) = self.inner.try_claim(&request) {
            return claim;
        }
        self.inner.purge_all();
        self.inner.try_claim(&request).unwrap_or(Err(StoreError::Full))
    }

    async fn complete(
        &self,
        id: &RecordId,
        owner: OwnerToken,
        record: Record,
        retention: Duration,
    ) -> Result<(), StoreError> {
        self.inner.with_owned(id, owner, |inner, shard, now| {
            let size = ENTRY_OVERHEAD + record.encoded_len();
            let Some(entry) = shard.map.get_mut(id) else { return Err(StoreError::NotOwner) };
            if size > entry.size {
                if !inner.reserve_bytes(size - entry.size) {
                    return Err(StoreError::Full);
                }
            } else {
                inner.bytes.fetch_sub(entry.size - size, Ordering::Relaxed);
            }
            entry.size = size;
            entry.state = State::Completed(record);
            entry.expires_at = now + retention;
            let expires_at = entry.expires_at;
            if let Some(waiters) = entry.waiters.take() {
                waiters.notify_waiters();
            }
            shard.expiries.push(Reverse((expires_at, *id)));
            Ok(())
        })
    }

    async fn release(&self, id: &RecordId, owner: OwnerToken) -> Result<(), StoreError> {
        self.inner.with_owned(id, owner, |inner, shard, _| {
            inner.remove(shard, id);
            Ok(())
        })
    }

    async fn renew(&self, id: &RecordId, owner: OwnerToken, lease: Duration) -> Result<(), StoreError> {
        self.inner.with_owned(id, owner, |_, shard, now| {
            if let Some(entry) = shard.map.get_mut(id) {
                entry.expires_at = now + lease;
                shard.expiries.push(Reverse((now + lease, *id)));
            }
            Ok(())
        })
    }

    async fn lookup(&self, id: &RecordId) -> Result<Option<RecordState>, StoreError> {
        let now = Instant::now();
        let shard = self.inner.shard(id);
        Ok(shard.map.get(id).filter(|entry| entry.expires_at > now).map(|entry| match &entry.state {
            State::InFlight { fingerprint, fencing_token, .. } => {
                RecordState::InFlight { fingerprint: *fingerprint, fencing_token: *fencing_token }
            }
            State::Completed(record) => RecordState::Completed(record.clone()),
        }))
    }

    async fn wait(&self, id: &RecordId, timeout: Duration) {
        let notified = {
            let now = Instant::now();
            let mut shard = self.inner.shard(id);
            let Some(entry) = shard.map.get_mut(id) else { return };
            if entry.expires_at <= now || !matches!(entry.state, State::InFlight { .. }) {
                return;
            }
            // Wake up by the lease's end at the latest: an expired lease
            // sends no signal.
            let deadline = entry.expires_at.min(now + timeout);
            let waiters = entry.waiters.get_or_insert_with(Default::default).clone();
            // Registered under the shard lock, so a completion that follows
            // cannot be missed.
            let mut notified = Box::pin(waiters.notified_owned());
            notified.as_mut().enable();
            (notified, deadline)
        };
        let (notified, deadline) = notified;
        let _ = tokio::time::timeout_at(deadline, notified).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_differ_in_any_byte_spread_over_shards_and_buckets() {
        let store = MemoryStore::new();
        for position in [0, 15, 16, 31] {
            let mut shards = std::collections::HashSet::new();
            let mut hashes = std::collections::HashSet::new();
            for value in 0..=255u8 {
                let mut bytes = [0x5a; 32];
                bytes[position] = value;
                let hash = store.inner.hasher.hash_one(RecordId::from_bytes(bytes));
                shards.insert((hash >> 32) % SHARDS as u64);
                hashes.insert(hash & 0xfff);
            }
            assert!(shards.len() >= 48, "byte {position}: {} of {SHARDS} shards", shards.len());
            assert!(hashes.len() >= 200, "byte {position}: {} distinct low bits", hashes.len());
        }
    }

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

    #[tokio::test(start_paused = true)]
    async fn expired_records_free_their_room() {
        let store = MemoryStore::with_limits(1, usize::MAX);
        assert!(matches!(store.claim(request(1)).await, Ok(Claim::Acquired(_))));
        assert!(matches!(store.claim(request(2)).await, Err(StoreError::Full)));
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(matches!(store.claim(request(2)).await, Ok(Claim::Acquired(_))));
        assert_eq!((store.len(), store.bytes()), (1, IN_FLIGHT_SIZE));
    }
}
