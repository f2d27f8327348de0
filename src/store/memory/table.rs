//! The sharded table of records behind [`super::MemoryStore`]: entries,
//! their expiry, and the entry and byte accounting against the limits.

use std::{
    collections::{BinaryHeap, HashMap, hash_map::RandomState},
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
    EvictionReason, FencingToken, Fingerprint, Metrics, Record, RecordId,
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
    /// Each scope's share, when the store caps them.
    scopes: Option<Shares>,
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

/// Room that was asked for (one more entry or not, and bytes) for a scope,
/// and where there was none: in the store, or in the scope's share. Once
/// [`Inner::make_room`] has reserved it, the same value says what the
/// caller holds.
#[derive(Clone, Copy, Debug)]
pub(super) struct NoRoom {
    pub(super) scope: u64,
    pub(super) in_scope: bool,
    pub(super) entry: bool,
    pub(super) bytes: usize,
    /// A record no pass may drop for this room: the one a `Rerun` take-over
    /// grows into.
    pub(super) keep: Option<IdPrefix>,
}

/// Passes one call of [`Inner::make_room`] makes at most: each either
/// drops records or finds that room appeared meanwhile.
const MAX_PASSES: usize = 64;

/// A cap per scope, and what each scope holds (in flight and completed),
/// sharded by scope; a scope that holds nothing has no entry.
struct Shares {
    max_entries: usize,
    max_bytes: usize,
    shards: Box<[Padded<Mutex<ShareMap>>]>,
}

type ShareMap = HashMap<u64, Share>;

#[derive(Clone, Copy, Default)]
struct Share {
    entries: usize,
    bytes: usize,
}

impl Shares {
    fn new(max_entries: usize, max_bytes: usize) -> Self {
        let shards = (0..SHARDS).map(|_| Padded(Mutex::new(HashMap::new()))).collect();
        Self { max_entries, max_bytes, shards }
    }

    fn shard(&self, scope: u64) -> MutexGuard<'_, ShareMap> {
        // Every update is one assignment: a poisoned lock holds no half write.
        self.shards[(scope % SHARDS as u64) as usize].lock().unwrap_or_else(|poison| poison.into_inner())
    }

    fn held(&self, scope: u64) -> Share {
        self.shard(scope).get(&scope).copied().unwrap_or_default()
    }

    fn reserve(&self, scope: u64, entry: bool, bytes: usize) -> bool {
        let mut shard = self.shard(scope);
        let share = shard.entry(scope).or_default();
        let entries = share.entries + usize::from(entry);
        let fits = entries <= self.max_entries && share.bytes.checked_add(bytes).is_some_and(|b| b <= self.max_bytes);
        if fits {
            *share = Share { entries, bytes: share.bytes + bytes };
        } else if share.entries == 0 && share.bytes == 0 {
            shard.remove(&scope);
        }
        fits
    }

    fn unreserve(&self, scope: u64, entry: bool, bytes: usize) {
        let mut shard = self.shard(scope);
        if let Some(share) = shard.get_mut(&scope) {
            share.entries = share.entries.saturating_sub(usize::from(entry));
            share.bytes = share.bytes.saturating_sub(bytes);
            if share.entries == 0 && share.bytes == 0 {
                shard.remove(&scope);
            }
        }
    }
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
    /// The claim's scope tag: what eviction shares room by.
    scope: u64,
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

/// Which completed records a pass drops: per scope, the latest expiry it
/// drops up to. Frees `to_free` (entries, bytes) one record at a time, each
/// the one closest to expiry of the scope that holds the most (its share of
/// the limit still being freed, against `limits`; of both while both are).
fn fair_cutoffs(
    by_scope: HashMap<u64, Vec<(Micros, usize)>>,
    to_free: (usize, usize),
    limits: (usize, usize),
) -> HashMap<u64, Micros> {
    let ((entries_to_free, bytes_to_free), (max_entries, max_bytes)) = (to_free, limits);
    // Per scope: its records closest to expiry first, the next to drop,
    // and the bytes of those not dropped.
    struct Held {
        scope: u64,
        records: Vec<(Micros, usize)>,
        next: usize,
        bytes: usize,
    }
    // A scope's share of the limits still being freed (entries / max_entries
    // against bytes / max_bytes, without division).
    let weight = |held: &Held, (entries, bytes): (bool, bool)| {
        let by_entries = if entries { (held.records.len() - held.next) as u128 * max_bytes as u128 } else { 0 };
        let by_bytes = if bytes { held.bytes as u128 * max_entries as u128 } else { 0 };
        by_entries.max(by_bytes)
    };
    let mut scopes = Vec::with_capacity(by_scope.len());
    for (scope, mut records) in by_scope {
        records.sort_unstable();
        let bytes = records.iter().map(|(_, size)| size).sum();
        scopes.push(Held { scope, records, next: 0, bytes });
    }
    let (mut freed_entries, mut freed_bytes, mut cutoffs) = (0, 0, HashMap::new());
    let (mut heap, mut weighed_for) = (BinaryHeap::new(), None);
    loop {
        let needed = (freed_entries < entries_to_free, freed_bytes < bytes_to_free);
        if needed == (false, false) {
            break;
        }
        // Once one limit is met, only the other decides who gives way.
        if weighed_for != Some(needed) {
            heap = (0..scopes.len())
                .filter(|&index| scopes[index].next < scopes[index].records.len())
                .map(|index| (weight(&scopes[index], needed), index))
                .collect();
            weighed_for = Some(needed);
        }
        let Some((_, index)) = heap.pop() else { break };
        let held = &mut scopes[index];
        let (expires_at, size) = held.records[held.next];
        (held.next, held.bytes) = (held.next + 1, held.bytes - size);
        (freed_entries, freed_bytes) = (freed_entries + 1, freed_bytes + size);
        cutoffs.insert(held.scope, expires_at);
        if held.next < held.records.len() {
            heap.push((weight(held, needed), index));
        }
    }
    cutoffs
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

    /// `scope_limit`: the most entries and bytes one scope may hold.
    pub(super) fn new(max_entries: usize, max_bytes: usize, scope_limit: Option<(usize, usize)>) -> Self {
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
            scopes: scope_limit.map(|(entries, bytes)| Shares::new(entries, bytes)),
            metrics: OnceLock::new(),
        }
    }

    pub(super) fn report_to(&self, metrics: &Metrics) {
        let _ = self.metrics.set(metrics.clone());
    }

    pub(super) fn limits(&self) -> (usize, usize) {
        (self.max_entries, self.max_bytes)
    }

    /// Makes the room `need` asks for (one more entry or not, and bytes, of
    /// its scope) and reserves it for the caller; `false` when dropping
    /// every completed record it may drop would not make it fit, in the
    /// scope's share and in the store both (and then that pass drops none).
    ///
    /// Drops expired records first, then completed ones, never in-flight
    /// ones. In the store, fairly: the scope holding the most completed
    /// records (entries or bytes, whichever limit was hit) gives way first,
    /// closest to expiry first within it, so a flood evicts the flooder's
    /// own records. In a scope's share: that scope's, closest to expiry
    /// first. Drops a batch (a thirty-second of the limit hit; at least a
    /// quarter of a small one, up to 8) beyond what is needed, so that a
    /// full store pays for the pass once per batch of claims. Claims that
    /// do not wait for this lock may take the room a pass frees: the call
    /// then makes another pass, up to [`MAX_PASSES`].
    pub(super) fn make_room(&self, mut need: NoRoom) -> bool {
        let _one_at_a_time = self.making_room.lock().unwrap_or_else(|poison| poison.into_inner());
        self.purge_all();
        for _ in 0..MAX_PASSES {
            match self.reserve(need.scope, need.entry, need.bytes) {
                Ok(()) => return true,
                Err(no_room) => need = NoRoom { keep: need.keep, ..no_room },
            }
            if self.drop_completed(need).is_none() {
                return false;
            }
        }
        false
    }

    /// Drops completed records until `need` is met plus a batch (see
    /// [`Self::make_room`]); how many it dropped, `None` when even all of
    /// them would not make room.
    fn drop_completed(&self, need: NoRoom) -> Option<u64> {
        let store_held = Share { entries: self.len(), bytes: self.bytes() };
        let needs = |held: Share, max_entries: usize, max_bytes: usize| {
            let entries = (held.entries + usize::from(need.entry)).saturating_sub(max_entries);
            (entries, held.bytes.saturating_add(need.bytes).saturating_sub(max_bytes))
        };
        let store_needs = needs(store_held, self.max_entries, self.max_bytes);
        let (max_entries, max_bytes, (needed_entries, needed_bytes), reason) = match (&self.scopes, need.in_scope) {
            (Some(shares), true) => {
                let held = shares.held(need.scope);
                let limits = (shares.max_entries, shares.max_bytes);
                (limits.0, limits.1, needs(held, limits.0, limits.1), EvictionReason::ScopeLimit)
            }
            _ => (self.max_entries, self.max_bytes, store_needs, EvictionReason::StoreFull),
        };
        let mut by_scope: HashMap<u64, Vec<(Micros, usize)>> = HashMap::new();
        let (mut all_count, mut all_size) = (0, 0);
        for shard in &*self.shards {
            let shard = shard.lock().unwrap_or_else(|poison| poison.into_inner());
            let droppable = |entry: &&Entry| matches!(entry.state, State::Completed(_)) && need.keep != Some(entry.id);
            for entry in shard.entries.iter().filter(droppable) {
                (all_count, all_size) = (all_count + 1, all_size + entry.size());
                if !need.in_scope || entry.scope == need.scope {
                    by_scope.entry(entry.scope).or_default().push((entry.expires_at, entry.size()));
                }
            }
        }
        let count: usize = by_scope.values().map(Vec::len).sum();
        let size: usize = by_scope.values().flatten().map(|(_, size)| size).sum();
        // What dropping every completed record would not make fit, in the
        // share or in the store, drops none.
        if count < needed_entries || size < needed_bytes || all_count < store_needs.0 || all_size < store_needs.1 {
            return None;
        }
        if (needed_entries, needed_bytes) == (0, 0) {
            // Room appeared since the reservation was refused.
            return Some(0);
        }
        let batch = |max: usize| (max / 32).max(max.min(32) / 4);
        let to_free = |needed: usize, max: usize| if needed > 0 { needed.saturating_add(batch(max)) } else { 0 };
        let cutoffs = fair_cutoffs(
            by_scope,
            (to_free(needed_entries, max_entries), to_free(needed_bytes, max_bytes)),
            (max_entries, max_bytes),
        );
        let mut dropped = 0u64;
        for shard in &*self.shards {
            let mut shard = shard.lock().unwrap_or_else(|poison| poison.into_inner());
            let droppable = |entry: &mut Entry| {
                matches!(entry.state, State::Completed(_))
                    && need.keep != Some(entry.id)
                    && cutoffs.get(&entry.scope).is_some_and(|&cutoff| entry.expires_at <= cutoff)
            };
            for entry in shard.entries.extract_if(droppable) {
                self.forget(entry);
                dropped += 1;
            }
        }
        if dropped == 0 {
            // What it chose was taken over or expired meanwhile.
            return Some(0);
        }
        if let Some(metrics) = self.metrics.get() {
            metrics.count_evictions(reason, dropped);
        }
        match reason {
            EvictionReason::ScopeLimit => tracing::info!(
                dropped,
                "a scope is at the memory store's limit per scope: dropped its completed records closest to expiry"
            ),
            _ => tracing::warn!(
                dropped,
                "the memory store is full: dropped completed records of the callers holding the most; a retry of one of their keys runs again"
            ),
        }
        Some(dropped)
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
        self.unreserve(entry.scope, true, entry.size());
        if let State::InFlight(in_flight) = entry.state
            && let Some(waiters) = in_flight.waiters
        {
            waiters.notify_waiters();
        }
    }

    /// Reserves room for `bytes` more bytes of `scope`, and one more entry
    /// if `entry`, or refuses and says where there was none.
    fn reserve(&self, scope: u64, entry: bool, bytes: usize) -> Result<(), NoRoom> {
        if let Some(shares) = &self.scopes
            && !shares.reserve(scope, entry, bytes)
        {
            return Err(NoRoom { scope, in_scope: true, entry, bytes, keep: None });
        }
        let entry_reserved = !entry
            || self
                .counts
                .entries
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < self.max_entries).then_some(n + 1))
                .is_ok();
        let bytes_reserved = entry_reserved
            && self
                .counts
                .bytes
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                    held.checked_add(bytes).filter(|&total| total <= self.max_bytes)
                })
                .is_ok();
        if bytes_reserved {
            return Ok(());
        }
        if entry && entry_reserved {
            self.counts.entries.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(shares) = &self.scopes {
            shares.unreserve(scope, entry, bytes);
        }
        Err(NoRoom { scope, in_scope: false, entry, bytes, keep: None })
    }

    /// Gives back room [`Self::reserve`] took.
    pub(super) fn unreserve(&self, scope: u64, entry: bool, bytes: usize) {
        if entry {
            self.counts.entries.fetch_sub(1, Ordering::Relaxed);
        }
        self.counts.bytes.fetch_sub(bytes, Ordering::Relaxed);
        if let Some(shares) = &self.scopes {
            shares.unreserve(scope, entry, bytes);
        }
    }

    /// Moves an entry of `scope` from `old` bytes to `new`, with `reserved`
    /// bytes already reserved for it; refuses a growth with no room (the
    /// reservation is then kept for the caller to give back or use).
    fn resize(&self, scope: u64, old: usize, new: usize, reserved: usize) -> Result<(), NoRoom> {
        let held = old + reserved;
        if new > held {
            self.reserve(scope, false, new - held)
        } else {
            self.unreserve(scope, false, held - new);
            Ok(())
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

    /// Claims `request`'s record, or says where there was no room; with
    /// `reserved`, a new entry's room (one entry, [`IN_FLIGHT_SIZE`]) was
    /// reserved by [`Self::make_room`], and is used or given back.
    pub(super) fn try_claim(
        &self,
        request: &ClaimRequest,
        reserved: Option<NoRoom>,
    ) -> Result<Result<Claim, StoreError>, NoRoom> {
        let scope = request.scope_tag();
        let give_back = |held: Option<NoRoom>| {
            if let Some(held) = held {
                self.unreserve(held.scope, held.entry, held.bytes);
            }
        };
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
                let take_over = request.replace_completed() && matches!(entry.state, State::Completed(_));
                // Bytes reserved for a take-over's growth, of this entry's scope.
                let growth_held = match reserved {
                    Some(held) if take_over && !held.entry && held.scope == entry.scope => held.bytes,
                    held => {
                        give_back(held);
                        0
                    }
                };
                return Ok(Ok(match &entry.state {
                    State::InFlight(in_flight) => Claim::InFlight { fingerprint: in_flight.fingerprint },
                    State::Completed(record) if !take_over => Claim::Completed(hand_out(record)),
                    State::Completed(_) => {
                        // A small record may be smaller than a claim's room.
                        let old = entry.size();
                        if let Err(no_room) = self.resize(entry.scope, old, IN_FLIGHT_SIZE, growth_held) {
                            give_back(reserved.filter(|_| growth_held > 0));
                            let bytes = IN_FLIGHT_SIZE.saturating_sub(old);
                            return Err(NoRoom { bytes, keep: Some(key), ..no_room });
                        }
                        let lease = self.new_lease(fencing, hash);
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
        match reserved {
            Some(held) if held.entry && held.scope == scope && held.bytes >= IN_FLIGHT_SIZE => {
                self.unreserve(scope, false, held.bytes - IN_FLIGHT_SIZE);
            }
            // On refusal the caller makes room without holding this shard's
            // lock, then tries again.
            held => {
                give_back(held);
                self.reserve(scope, true, IN_FLIGHT_SIZE)?;
            }
        }
        let lease = self.new_lease(fencing, hash);
        let expires_at = after(now, request.lease());
        vacant.insert(Entry { id: key, expires_at, scope, state: in_flight(lease) });
        expiries.push(expires_at, hash);
        Ok(Ok(Claim::Acquired(lease)))
    }

    /// Completes the claim of `owner` with `record`, kept for `retention`,
    /// with `reserved` bytes reserved for it by [`Self::make_room`]; hands
    /// the record back, and says where, when it does not fit.
    pub(super) fn complete(
        &self,
        id: &RecordId,
        owner: OwnerToken,
        record: Record,
        retention: Duration,
        reserved: usize,
    ) -> Result<Result<(), (Record, NoRoom)>, StoreError> {
        self.with_owned(id, owner, |inner, mut found, expiries, hash, now| {
            let size = ENTRY_OVERHEAD + record.encoded_len();
            let entry = found.get_mut();
            if let Err(no_room) = inner.resize(entry.scope, entry.size(), size, reserved) {
                return Ok(Err((record, no_room)));
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
        match table.try_claim(&request, None) {
            Ok(Ok(Claim::Acquired(lease))) => lease,
            _ => panic!("key {n} was not claimed"),
        }
    }

    #[test]
    fn once_the_entries_are_freed_the_bytes_alone_decide_who_gives_way() {
        // Scope 1: 50 small records; scope 2: two large ones.
        let small: Vec<(Micros, usize)> = (0..50).map(|n| (n, 10)).collect();
        let by_scope = HashMap::from([(1, small), (2, vec![(0, 1000), (1, 1000)])]);
        // One entry and 1,500 bytes to free.
        let cutoffs = fair_cutoffs(by_scope, (1, 1500), (100, 10_000));
        assert_eq!(cutoffs.get(&1), Some(&0), "the small records' scope gave more than its one record");
        assert_eq!(cutoffs.get(&2), Some(&1));
    }

    #[test]
    fn owner_tokens_are_unique_across_shards_and_fencing_tokens_grow_per_key() {
        let table = Inner::new(10_000, usize::MAX, None);
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
        let table = Inner::new(1, 1, None);
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
