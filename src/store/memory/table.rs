//! The sharded table of records behind [`super::MemoryStore`]: entries,
//! their expiry, and the entry and byte accounting against the limits.

use std::{
    collections::hash_map::RandomState,
    hash::BuildHasher,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use hashbrown::{
    HashTable,
    hash_table::{self, OccupiedEntry},
};
use tokio::{
    sync::{Notify, futures::OwnedNotified},
    time::Instant,
};

use super::expiries::{Expiries, Micros, after};
use crate::{
    FencingToken, Fingerprint, Metrics, Record, RecordId,
    store::{Claim, ClaimRequest, Lease, OwnerToken, RecordState, StoreError},
};

pub(super) const SHARDS: usize = 64;
/// Bytes counted for an entry besides its record: the id, the entry and its
/// expiry slot.
pub(super) const ENTRY_OVERHEAD: usize = 160;
/// Bytes counted for an in-flight entry: enough that completing it with a
/// "not stored" record never needs more room, so that completion cannot be
/// refused by a full store.
pub(super) const IN_FLIGHT_SIZE: usize = ENTRY_OVERHEAD + 64;
/// Expired entries removed per call, so no call pays for a large backlog.
const PURGE_PER_CALL: usize = 32;
/// Records up to this size are copied out for each replay rather than
/// shared: sharing gives a record's buffer a reference count for as long
/// as it is kept (32 bytes of heap, a lot beside a small record), while a
/// copy of a few KiB costs well under a microsecond.
const COPY_LIMIT: usize = 4096;

pub(super) struct Inner {
    shards: Box<[Padded<Mutex<Shard>>]>,
    hasher: IdHashing,
    epoch: Instant,
    /// Written on every claim and completion, by every thread: apart from
    /// what is only read, so that those writes do not evict it.
    counts: Padded<Counts>,
    max_entries: usize,
    max_bytes: usize,
    owner_seed: u64,
    /// Held by the one call that makes room, so a burst of claims on a full
    /// store makes room once.
    making_room: Mutex<()>,
    /// Where dropped records are counted: the layer's counters, once a
    /// layer is made on the store.
    metrics: OnceLock<Metrics>,
}

/// A value alone on its cache lines (two: neighbouring lines are fetched
/// in pairs), so that writes to what sits beside it do not evict it.
#[repr(align(128))]
struct Padded<T>(T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

struct Counts {
    entries: AtomicUsize,
    bytes: AtomicUsize,
}

struct Shard {
    entries: HashTable<Entry>,
    /// The last fencing token handed out here. A key always lands in the
    /// same shard, so its tokens grow, as the SPEC asks, with no counter
    /// shared by every thread.
    fencing: u64,
    /// When entries may have expired, soonest first, with the hash of their
    /// id. Every entry has a slot no later than its expiry; a slot that comes
    /// due removes the expired entries of its hash, and moves on to the
    /// soonest expiry of those still live (a completed record's retention
    /// outlasts the lease its claim was slotted for).
    expiries: Expiries,
}

pub(super) struct Entry {
    id: IdPrefix,
    expires_at: Micros,
    state: State,
}

/// The first 16 bytes of a record id, which is what an entry keeps of it.
/// Ids are SHA-256 digests of (namespace, scope, key): two that share 128
/// bits take about 2^64 hashes to find, and could then only be two keys of
/// the same client (its scope is in both); to hit another client's record
/// would take a second preimage, about 2^128.
type IdPrefix = [u8; 16];

fn prefix(id: &RecordId) -> IdPrefix {
    let mut prefix = [0; 16];
    prefix.copy_from_slice(&id.as_bytes()[..16]);
    prefix
}

enum State {
    /// Boxed: in flight is brief, and most entries are completed ones.
    InFlight(Box<InFlight>),
    Completed(Record),
}

struct InFlight {
    owner: OwnerToken,
    fencing_token: FencingToken,
    fingerprint: Fingerprint,
    waiters: Option<Arc<Notify>>,
}

impl Entry {
    /// Bytes counted against the byte limit.
    fn size(&self) -> usize {
        match &self.state {
            State::InFlight(_) => IN_FLIGHT_SIZE,
            State::Completed(record) => ENTRY_OVERHEAD + record.encoded_len(),
        }
    }
}

/// Hashes record ids, for the shards and their tables. Ids are SHA-256
/// digests, uniform already; folding their bits with two secret seeds
/// (multiplications, as `foldhash` does) keeps a client, who can compute
/// the ids of its keys, from aiming many keys at one bucket, for a fraction
/// of SipHash's cost.
#[derive(Clone)]
struct IdHashing {
    seeds: [u64; 2],
}

impl IdHashing {
    fn hash(&self, id: &IdPrefix) -> u64 {
        let (low, high) = id.split_at(8);
        let low = u64::from_le_bytes(low.try_into().unwrap_or_default());
        let high = u64::from_le_bytes(high.try_into().unwrap_or_default());
        let hash = fold(u128::from(low ^ self.seeds[0]) * u128::from(high ^ self.seeds[1]));
        // One more round, so that every byte reaches every bit.
        fold(u128::from(hash ^ self.seeds[0]) * u128::from(self.seeds[1]))
    }
}

fn fold(product: u128) -> u64 {
    (product as u64) ^ ((product >> 64) as u64)
}

/// A kept record for a caller: copied when small, shared when large (see
/// [`COPY_LIMIT`]).
fn hand_out(record: &Record) -> Record {
    if record.encoded_len() <= COPY_LIMIT { record.copied() } else { record.clone() }
}

/// The shard of a hash: bits its table uses neither for its buckets (the
/// low ones) nor for its tags (the top seven).
fn shard_index(hash: u64) -> usize {
    ((hash >> 32) as usize) % SHARDS
}

impl Inner {
    /// Entries held, expired ones not yet reclaimed included.
    pub(super) fn len(&self) -> usize {
        self.counts.entries.load(Ordering::Relaxed)
    }

    /// Bytes counted against the byte limit.
    pub(super) fn bytes(&self) -> usize {
        self.counts.bytes.load(Ordering::Relaxed)
    }

    pub(super) fn new(max_entries: usize, max_bytes: usize) -> Self {
        let random = RandomState::new();
        let owner_seed = random.hash_one(0u8);
        let hasher = IdHashing { seeds: [random.hash_one(1u8), random.hash_one(2u8) | 1] };
        Self {
            shards: (0..SHARDS)
                .map(|_| Padded(Mutex::new(Shard { entries: HashTable::new(), fencing: 0, expiries: Expiries::new() })))
                .collect(),
            hasher,
            epoch: Instant::now(),
            counts: Padded(Counts { entries: AtomicUsize::new(0), bytes: AtomicUsize::new(0) }),
            max_entries,
            max_bytes,
            owner_seed,
            making_room: Mutex::new(()),
            metrics: OnceLock::new(),
        }
    }

    pub(super) fn report_to(&self, metrics: &Metrics) {
        let _ = self.metrics.set(metrics.clone());
    }

    /// Makes room for `bytes` more bytes, and one more entry if
    /// `new_entry`: drops expired
    /// records, then completed ones, closest to expiry first, never an
    /// in-flight one. Drops a batch (a thirty-second of the limits) beyond
    /// what is needed, so that a full store pays for the pass once per
    /// batch of claims, not on each. Returns whether the room is there.
    pub(super) fn make_room(&self, new_entry: bool, bytes: usize) -> bool {
        let _one_at_a_time = self.making_room.lock().unwrap_or_else(|poison| poison.into_inner());
        self.purge_all();
        let entries = usize::from(new_entry);
        let fits =
            |inner: &Self| inner.len() + entries <= inner.max_entries && inner.bytes() + bytes <= inner.max_bytes;
        if fits(self) {
            return true;
        }
        let mut completed: Vec<(Micros, usize)> = Vec::new();
        for shard in &*self.shards {
            let shard = shard.lock().unwrap_or_else(|poison| poison.into_inner());
            let sizes = shard.entries.iter().filter(|entry| matches!(entry.state, State::Completed(_)));
            completed.extend(sizes.map(|entry| (entry.expires_at, entry.size())));
        }
        let needed_entries = (self.len() + entries).saturating_sub(self.max_entries);
        let needed_bytes = (self.bytes() + bytes).saturating_sub(self.max_bytes);
        // What dropping every completed record would not make fit drops none.
        if completed.len() < needed_entries || completed.iter().map(|(_, size)| size).sum::<usize>() < needed_bytes {
            return false;
        }
        completed.sort_unstable();
        let entries_to_free = needed_entries + self.max_entries / 32;
        let bytes_to_free = needed_bytes + self.max_bytes / 32;
        let (mut freed_entries, mut freed_bytes, mut cutoff) = (0, 0, None);
        for (expires_at, size) in completed {
            if freed_entries >= entries_to_free && freed_bytes >= bytes_to_free {
                break;
            }
            (freed_entries, freed_bytes, cutoff) = (freed_entries + 1, freed_bytes + size, Some(expires_at));
        }
        let Some(cutoff) = cutoff else { return false };
        let mut dropped = 0u64;
        for shard in &*self.shards {
            let mut shard = shard.lock().unwrap_or_else(|poison| poison.into_inner());
            let droppable =
                |entry: &mut Entry| entry.expires_at <= cutoff && matches!(entry.state, State::Completed(_));
            for entry in shard.entries.extract_if(droppable) {
                self.forget(entry);
                dropped += 1;
            }
        }
        if let Some(metrics) = self.metrics.get() {
            metrics.count_evictions(dropped);
        }
        tracing::warn!(
            dropped,
            "the memory store is full: dropped the completed records closest to expiry; a retry of one of their keys runs again"
        );
        fits(self)
    }

    fn now(&self) -> Micros {
        u64::try_from(Instant::now().saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX)
    }

    fn instant(&self, at: Micros) -> Option<Instant> {
        self.epoch.checked_add(Duration::from_micros(at))
    }

    fn shard(&self, hash: u64) -> MutexGuard<'_, Shard> {
        // A panic while a shard was locked cannot leave an entry half
        // written (every update is one assignment), so poison is ignored.
        self.shards[shard_index(hash)].lock().unwrap_or_else(|poison| poison.into_inner())
    }

    /// Handles up to `limit` expiry slots that are due.
    fn purge(&self, shard: &mut Shard, now: Micros, limit: usize) {
        for _ in 0..limit {
            let Some(hash) = shard.expiries.pop_due(now) else { return };
            while let Ok(expired) = shard.entries.find_entry(hash, |entry| entry.expires_at <= now) {
                let (entry, _) = expired.remove();
                self.forget(entry);
            }
            let next = shard.entries.iter_hash(hash).map(|entry| entry.expires_at).min();
            if let Some(next) = next {
                shard.expiries.push(next, hash);
            }
        }
    }

    pub(super) fn purge_all(&self) {
        let now = self.now();
        for shard in &*self.shards {
            let mut shard = shard.lock().unwrap_or_else(|poison| poison.into_inner());
            self.purge(&mut shard, now, usize::MAX);
        }
    }

    /// Accounts for an entry taken out of its table.
    fn forget(&self, entry: Entry) {
        self.counts.entries.fetch_sub(1, Ordering::Relaxed);
        self.counts.bytes.fetch_sub(entry.size(), Ordering::Relaxed);
        if let State::InFlight(in_flight) = entry.state
            && let Some(waiters) = in_flight.waiters
        {
            waiters.notify_waiters();
        }
    }

    /// Reserves room for `delta` more bytes, or refuses.
    fn reserve_bytes(&self, delta: usize) -> bool {
        self.counts
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bytes| {
                bytes.checked_add(delta).filter(|&total| total <= self.max_bytes)
            })
            .is_ok()
    }

    fn reserve_entry(&self) -> bool {
        let reserved = self
            .counts
            .entries
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < self.max_entries).then_some(n + 1))
            .is_ok();
        if reserved && !self.reserve_bytes(IN_FLIGHT_SIZE) {
            self.counts.entries.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        reserved
    }

    /// Moves the byte count from an entry's old size to its new one. Never
    /// refuses: a claim's in-flight size is room it already holds.
    fn resize(&self, old: usize, new: usize) {
        if old > new {
            self.counts.bytes.fetch_sub(old - new, Ordering::Relaxed);
        } else {
            self.counts.bytes.fetch_add(new - old, Ordering::Relaxed);
        }
    }

    /// A lease from a shard's fencing counter; its owner token holds the
    /// shard's index too, so that no two claims anywhere share one.
    fn new_lease(&self, fencing: &mut u64, hash: u64) -> Lease {
        *fencing += 1;
        let seed = self.owner_seed ^ shard_index(hash) as u64;
        let owner = (u128::from(seed) << 64) | u128::from(*fencing);
        Lease::new(OwnerToken::from_u128(owner), FencingToken::new(*fencing))
    }

    /// Runs `f` on the live entry owned by `owner`, or reports `NotOwner`;
    /// `f` gets the entry, found once, and the shard's expiry slots.
    fn with_owned<T>(
        &self,
        id: &RecordId,
        owner: OwnerToken,
        f: impl FnOnce(&Self, OccupiedEntry<'_, Entry>, &mut Expiries, u64, Micros) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let now = self.now();
        let key = prefix(id);
        let hash = self.hasher.hash(&key);
        let mut guard = self.shard(hash);
        let shard = &mut *guard;
        self.purge(shard, now, PURGE_PER_CALL);
        let Shard { entries, expiries, .. } = shard;
        match entries.find_entry(hash, |entry| entry.id == key) {
            Ok(found)
                if found.get().expires_at > now
                    && matches!(&found.get().state, State::InFlight(in_flight) if in_flight.owner == owner) =>
            {
                f(self, found, expiries, hash, now)
            }
            _ => Err(StoreError::NotOwner),
        }
    }

    pub(super) fn try_claim(&self, request: &ClaimRequest) -> Option<Result<Claim, StoreError>> {
        let now = self.now();
        let key = prefix(&request.id());
        let hash = self.hasher.hash(&key);
        let mut guard = self.shard(hash);
        let shard = &mut *guard;
        self.purge(shard, now, PURGE_PER_CALL);
        let in_flight = |lease: Lease| {
            State::InFlight(Box::new(InFlight {
                owner: lease.owner(),
                fencing_token: lease.fencing_token(),
                fingerprint: request.fingerprint(),
                waiters: None,
            }))
        };
        let Shard { entries, fencing, expiries } = shard;
        // One probe: a miss keeps its slot for the insert.
        let vacant = match entries.entry(hash, |entry| entry.id == key, |entry| self.hasher.hash(&entry.id)) {
            hash_table::Entry::Occupied(mut found) if found.get().expires_at > now => {
                let entry = found.get_mut();
                return Some(Ok(match &entry.state {
                    State::InFlight(in_flight) => Claim::InFlight { fingerprint: in_flight.fingerprint },
                    State::Completed(record) if !request.replace_completed() => Claim::Completed(hand_out(record)),
                    State::Completed(_) => {
                        let lease = self.new_lease(fencing, hash);
                        self.resize(entry.size(), IN_FLIGHT_SIZE);
                        entry.state = in_flight(lease);
                        // Sooner than the retention it had: it needs a slot.
                        entry.expires_at = after(now, request.lease());
                        expiries.push(entry.expires_at, hash);
                        Claim::Acquired(lease)
                    }
                }));
            }
            hash_table::Entry::Occupied(expired) => {
                let (entry, vacant) = expired.remove();
                self.forget(entry);
                vacant
            }
            hash_table::Entry::Vacant(vacant) => vacant,
        };
        if !self.reserve_entry() {
            // Let the caller reclaim expired records without holding this
            // shard's lock, then try once more.
            return None;
        }
        let lease = self.new_lease(fencing, hash);
        let expires_at = after(now, request.lease());
        vacant.insert(Entry { id: key, expires_at, state: in_flight(lease) });
        expiries.push(expires_at, hash);
        Some(Ok(Claim::Acquired(lease)))
    }

    /// Completes the claim of `owner` with `record`, kept for `retention`;
    /// hands the record back when it does not fit.
    pub(super) fn complete(
        &self,
        id: &RecordId,
        owner: OwnerToken,
        record: Record,
        retention: Duration,
    ) -> Result<Result<(), Record>, StoreError> {
        self.with_owned(id, owner, |inner, mut found, expiries, hash, now| {
            let size = ENTRY_OVERHEAD + record.encoded_len();
            let entry = found.get_mut();
            let old = entry.size();
            if size > old && !inner.reserve_bytes(size - old) {
                return Ok(Err(record));
            }
            if size <= old {
                inner.resize(old, size);
            }
            let expires_at = after(now, retention);
            let sooner = expires_at < entry.expires_at;
            entry.expires_at = expires_at;
            let State::InFlight(in_flight) = std::mem::replace(&mut entry.state, State::Completed(record)) else {
                return Ok(Ok(()));
            };
            if let Some(waiters) = in_flight.waiters {
                waiters.notify_waiters();
            }
            // A retention shorter than what was left of the lease.
            if sooner {
                expiries.push(expires_at, hash);
            }
            Ok(Ok(()))
        })
    }

    /// Gives the claim of `owner` up.
    pub(super) fn release(&self, id: &RecordId, owner: OwnerToken) -> Result<(), StoreError> {
        self.with_owned(id, owner, |inner, found, _, _, _| {
            inner.forget(found.remove().0);
            Ok(())
        })
    }

    /// Extends the claim of `owner` to `lease` from now.
    pub(super) fn renew(&self, id: &RecordId, owner: OwnerToken, lease: Duration) -> Result<(), StoreError> {
        self.with_owned(id, owner, |_, mut found, expiries, hash, now| {
            let entry = found.get_mut();
            let expires_at = after(now, lease);
            if expires_at < entry.expires_at {
                expiries.push(expires_at, hash);
            }
            entry.expires_at = expires_at;
            Ok(())
        })
    }

    /// The state of the record `id`, if it is live.
    pub(super) fn lookup(&self, id: &RecordId) -> Option<RecordState> {
        let now = self.now();
        let key = prefix(id);
        let hash = self.hasher.hash(&key);
        let shard = self.shard(hash);
        let entry = shard.entries.find(hash, |entry| entry.id == key).filter(|entry| entry.expires_at > now);
        entry.map(|entry| match &entry.state {
            State::InFlight(in_flight) => RecordState::InFlight {
                fingerprint: Some(in_flight.fingerprint),
                fencing_token: Some(in_flight.fencing_token),
            },
            State::Completed(record) => RecordState::Completed(hand_out(record)),
        })
    }

    /// A signal for when the in-flight record `id` completes or is released,
    /// and when to stop waiting for it (its lease's end, or `timeout`);
    /// `None` when it is not in flight.
    pub(super) fn wake_on_settle(
        &self,
        id: &RecordId,
        timeout: Duration,
    ) -> Option<(Pin<Box<OwnedNotified>>, Option<Instant>)> {
        let now = self.now();
        let key = prefix(id);
        let hash = self.hasher.hash(&key);
        let mut shard = self.shard(hash);
        let entry = shard.entries.find_mut(hash, |entry| entry.id == key)?;
        let State::InFlight(in_flight) = &mut entry.state else { return None };
        if entry.expires_at <= now {
            return None;
        }
        // Wake up by the lease's end at the latest: an expired lease sends
        // no signal.
        let deadline = self.instant(entry.expires_at.min(after(now, timeout)));
        let waiters = in_flight.waiters.get_or_insert_with(Default::default).clone();
        // Registered under the shard lock, so a completion that follows
        // cannot be missed.
        let mut notified = Box::pin(waiters.notified_owned());
        notified.as_mut().enable();
        Some((notified, deadline))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> RecordId {
        let mut bytes = [0x5a; 32];
        bytes[0] = n;
        RecordId::from_bytes(bytes)
    }

    fn claim(table: &Inner, n: u8) -> Lease {
        let request = ClaimRequest::new(id(n), Fingerprint::from_bytes([0; 32]), Duration::from_secs(30));
        match table.try_claim(&request) {
            Some(Ok(Claim::Acquired(lease))) => lease,
            _ => panic!("key {n} was not claimed"),
        }
    }

    #[test]
    fn owner_tokens_are_unique_across_shards_and_fencing_tokens_grow_per_key() {
        let table = Inner::new(10_000, usize::MAX);
        let leases: Vec<Lease> = (0..=255).map(|n| claim(&table, n)).collect();
        let owners: std::collections::HashSet<_> = leases.iter().map(Lease::owner).collect();
        let tokens: std::collections::HashSet<_> = leases.iter().map(Lease::fencing_token).collect();
        // Each shard counts from 1: tokens repeat across shards, owners never.
        assert!(tokens.len() < 256, "every token differs: this shows nothing of the owners");
        assert_eq!(owners.len(), 256);
        table.release(&id(7), leases[7].owner()).unwrap();
        assert!(claim(&table, 7).fencing_token() > leases[7].fencing_token());
    }

    #[test]
    fn ids_that_differ_in_any_byte_spread_over_shards_and_buckets() {
        let table = Inner::new(1, 1);
        // An entry keeps, and its hash reads, the first 16 bytes of the id.
        for position in [0, 7, 8, 15] {
            let mut shards = std::collections::HashSet::new();
            let mut hashes = std::collections::HashSet::new();
            for value in 0..=255u8 {
                let mut bytes = [0x5a; 32];
                bytes[position] = value;
                let hash = table.hasher.hash(&prefix(&RecordId::from_bytes(bytes)));
                shards.insert((hash >> 32) % SHARDS as u64);
                hashes.insert(hash & 0xfff);
            }
            assert!(shards.len() >= 48, "byte {position}: {} of {SHARDS} shards", shards.len());
            assert!(hashes.len() >= 200, "byte {position}: {} distinct low bits", hashes.len());
        }
    }
}
