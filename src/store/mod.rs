//! Where records live: the [`Store`] trait and the stores this crate ships.
//!
//! A store keeps one record per [`RecordId`] and moves it through this life:
//!
//! ```text
//! absent --claim--> in_flight(owner, fencing token, fingerprint, lease)
//! in_flight --complete(owner)--> completed(record, retention)
//! in_flight --release(owner)--> absent
//! in_flight --lease runs out--> absent
//! completed --retention runs out--> absent
//! ```
//!
//! The trait uses `fn .. -> impl Future + Send` rather than `async_trait`: the
//! layer is generic over its store, so every call is static and unboxed on
//! the hot path. A store therefore cannot be a `dyn Store`; wrap several
//! stores in an enum of your own if you must choose one at run time.

use std::{fmt, future::Future, time::Duration};

use crate::{Fingerprint, Metrics, Record, RecordId, Scope};

pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;

pub use memory::MemoryStore;

/// Who holds an in-flight claim. Complete, release and renew act only when
/// given the current owner.
///
/// # Example
/// ```
/// use tower_idempotency::store::OwnerToken;
///
/// assert_ne!(OwnerToken::from_u128(1), OwnerToken::from_u128(2));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct OwnerToken(u128);

impl OwnerToken {
    /// An owner token from its 128 bits.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::store::OwnerToken;
    /// assert_eq!(OwnerToken::from_u128(7).as_u128(), 7);
    /// ```
    pub fn from_u128(value: u128) -> Self {
        Self(value)
    }

    /// The token's 128 bits.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::store::OwnerToken;
    /// assert_eq!(OwnerToken::from_u128(u128::MAX).as_u128(), u128::MAX);
    /// ```
    pub fn as_u128(self) -> u128 {
        self.0
    }
}

/// Owner tokens for a store shared by processes (Redis, PostgreSQL): a
/// random nonce of this source, then a count of its claims, so no two claims
/// anywhere share one.
pub(crate) struct OwnerTokens {
    nonce: u64,
    claims: std::sync::atomic::AtomicU64,
}

impl OwnerTokens {
    /// A source with a nonce of its own.
    pub(crate) fn new() -> Self {
        let nonce = std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), 0u8);
        Self { nonce, claims: std::sync::atomic::AtomicU64::new(0) }
    }

    pub(crate) fn next(&self) -> OwnerToken {
        let claim = self.claims.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        OwnerToken::from_u128((u128::from(self.nonce) << 64) | u128::from(claim))
    }
}

impl fmt::Debug for OwnerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OwnerToken({:032x})", self.0)
    }
}

/// A number that grows with every claim of the same record, across releases
/// and expired leases: pass it to a downstream system so it can refuse a
/// stale writer.
///
/// That is all a handler may rely on: tokens grow per record. Tokens of
/// different records are unrelated (the memory store counts across all its
/// records, Redis per hash slot), and a store that loses its data (a
/// memory store restarted, a Redis without persistence) starts again.
///
/// # Example
/// ```
/// use tower_idempotency::FencingToken;
///
/// assert!(FencingToken::new(2) > FencingToken::new(1));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(u64);

impl FencingToken {
    /// A fencing token from its value.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::FencingToken;
    /// assert_eq!(FencingToken::new(3).get(), 3);
    /// ```
    pub fn new(value: u64) -> Self {
        Self(value)
    }

    /// The token's value.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::FencingToken;
    /// assert_eq!(FencingToken::new(9).get(), 9);
    /// ```
    pub fn get(self) -> u64 {
        self.0
    }
}

/// A claim the store granted.
///
/// # Example
/// ```
/// use tower_idempotency::{FencingToken, store::{Lease, OwnerToken}};
///
/// let lease = Lease::new(OwnerToken::from_u128(1), FencingToken::new(1));
/// assert_eq!(lease.fencing_token(), FencingToken::new(1));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    owner: OwnerToken,
    fencing_token: FencingToken,
}

impl Lease {
    /// A lease for `owner` with `fencing_token`.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::{FencingToken, store::{Lease, OwnerToken}};
    /// let lease = Lease::new(OwnerToken::from_u128(5), FencingToken::new(2));
    /// assert_eq!(lease.owner(), OwnerToken::from_u128(5));
    /// ```
    pub fn new(owner: OwnerToken, fencing_token: FencingToken) -> Self {
        Self { owner, fencing_token }
    }

    /// The owner token to pass to complete, release and renew.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::{FencingToken, store::{Lease, OwnerToken}};
    /// # let lease = Lease::new(OwnerToken::from_u128(5), FencingToken::new(2));
    /// let _ = lease.owner();
    /// ```
    pub fn owner(&self) -> OwnerToken {
        self.owner
    }

    /// The claim's fencing token.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::{FencingToken, store::{Lease, OwnerToken}};
    /// # let lease = Lease::new(OwnerToken::from_u128(5), FencingToken::new(2));
    /// assert_eq!(lease.fencing_token().get(), 2);
    /// ```
    pub fn fencing_token(&self) -> FencingToken {
        self.fencing_token
    }
}

/// What one claim asks of the store.
///
/// # Example
/// ```
/// use std::time::Duration;
/// use tower_idempotency::{Fingerprint, RecordId, store::ClaimRequest};
///
/// let request = ClaimRequest::new(RecordId::from_bytes([0; 32]), Fingerprint::from_bytes([1; 32]), Duration::from_secs(30));
/// assert!(!request.replace_completed());
/// ```
#[derive(Debug, Clone, Copy)]
pub struct ClaimRequest {
    id: RecordId,
    fingerprint: Fingerprint,
    lease: Duration,
    replace_completed: bool,
    fencing_token: bool,
    scope: u64,
}

impl ClaimRequest {
    /// A claim of `id` by a request with `fingerprint`, for `lease`.
    ///
    /// # Example
    /// ```
    /// # use std::time::Duration;
    /// # use tower_idempotency::{Fingerprint, RecordId, store::ClaimRequest};
    /// let request = ClaimRequest::new(RecordId::from_bytes([0; 32]), Fingerprint::from_bytes([1; 32]), Duration::from_secs(1));
    /// assert_eq!(request.lease(), Duration::from_secs(1));
    /// ```
    pub fn new(id: RecordId, fingerprint: Fingerprint, lease: Duration) -> Self {
        Self { id, fingerprint, lease, replace_completed: false, fencing_token: true, scope: 0 }
    }

    /// Says whose claim this is, so that a store can share its room fairly
    /// between callers (the memory store evicts from the scope that holds
    /// the most). Without it every claim counts as one shared scope.
    ///
    /// # Example
    /// ```
    /// # use std::time::Duration;
    /// # use tower_idempotency::{Fingerprint, RecordId, Scope, store::ClaimRequest};
    /// let id = RecordId::from_bytes([0; 32]);
    /// let request = ClaimRequest::new(id, Fingerprint::from_bytes([1; 32]), Duration::from_secs(1));
    /// let tenant = request.with_scope(&Scope::new("tenant-7"));
    /// assert_ne!(tenant.scope_tag(), request.scope_tag());
    /// assert_eq!(tenant.scope_tag(), request.with_scope(&Scope::new("tenant-7")).scope_tag());
    /// ```
    #[must_use]
    pub fn with_scope(mut self, scope: &Scope) -> Self {
        self.scope = scope.tag();
        self
    }

    /// [`Self::with_scope`] with the scope's tag computed once already.
    #[must_use]
    pub(crate) fn with_scope_tag(mut self, tag: u64) -> Self {
        self.scope = tag;
        self
    }

    /// A 64-bit digest of the claim's scope, the same for the same scope
    /// within one process (keyed per process, so callers cannot aim at
    /// another's); 0 when no scope was given.
    ///
    /// # Example
    /// ```
    /// # use std::time::Duration;
    /// # use tower_idempotency::{Fingerprint, RecordId, store::ClaimRequest};
    /// # let request = ClaimRequest::new(RecordId::from_bytes([0; 32]), Fingerprint::from_bytes([1; 32]), Duration::from_secs(1));
    /// assert_eq!(request.scope_tag(), 0);
    /// ```
    pub fn scope_tag(&self) -> u64 {
        self.scope
    }

    /// Lets the claim take over a completed record (the `Rerun` strategy).
    ///
    /// # Example
    /// ```
    /// # use std::time::Duration;
    /// # use tower_idempotency::{Fingerprint, RecordId, store::ClaimRequest};
    /// let request = ClaimRequest::new(RecordId::from_bytes([0; 32]), Fingerprint::from_bytes([1; 32]), Duration::from_secs(1))
    ///     .with_replace_completed(true);
    /// assert!(request.replace_completed());
    /// ```
    #[must_use]
    pub fn with_replace_completed(mut self, replace: bool) -> Self {
        self.replace_completed = replace;
        self
    }

    /// Whether the claim needs a fencing token (the default). Without one a
    /// store may claim more cheaply (Redis: one `SET … NX GET`, no counter),
    /// and grants [`FencingToken::new(0)`](FencingToken::new).
    ///
    /// # Example
    /// ```
    /// # use std::time::Duration;
    /// # use tower_idempotency::{Fingerprint, RecordId, store::ClaimRequest};
    /// let request = ClaimRequest::new(RecordId::from_bytes([0; 32]), Fingerprint::from_bytes([1; 32]), Duration::from_secs(1))
    ///     .with_fencing_token(false);
    /// assert!(!request.fencing_token());
    /// ```
    #[must_use]
    pub fn with_fencing_token(mut self, needed: bool) -> Self {
        self.fencing_token = needed;
        self
    }

    /// Whether the claim needs a fencing token.
    ///
    /// # Example
    /// ```
    /// # use std::time::Duration;
    /// # use tower_idempotency::{Fingerprint, RecordId, store::ClaimRequest};
    /// # let request = ClaimRequest::new(RecordId::from_bytes([0; 32]), Fingerprint::from_bytes([1; 32]), Duration::from_secs(1));
    /// assert!(request.fencing_token());
    /// ```
    pub fn fencing_token(&self) -> bool {
        self.fencing_token
    }

    /// The record claimed.
    ///
    /// # Example
    /// ```
    /// # use std::time::Duration;
    /// # use tower_idempotency::{Fingerprint, RecordId, store::ClaimRequest};
    /// # let request = ClaimRequest::new(RecordId::from_bytes([0; 32]), Fingerprint::from_bytes([1; 32]), Duration::from_secs(1));
    /// assert_eq!(request.id(), RecordId::from_bytes([0; 32]));
    /// ```
    pub fn id(&self) -> RecordId {
        self.id
    }

    /// The claiming request's fingerprint, kept while in flight.
    ///
    /// # Example
    /// ```
    /// # use std::time::Duration;
    /// # use tower_idempotency::{Fingerprint, RecordId, store::ClaimRequest};
    /// # let request = ClaimRequest::new(RecordId::from_bytes([0; 32]), Fingerprint::from_bytes([1; 32]), Duration::from_secs(1));
    /// assert_eq!(request.fingerprint(), Fingerprint::from_bytes([1; 32]));
    /// ```
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// How long the claim lives without renewal.
    ///
    /// # Example
    /// ```
    /// # use std::time::Duration;
    /// # use tower_idempotency::{Fingerprint, RecordId, store::ClaimRequest};
    /// # let request = ClaimRequest::new(RecordId::from_bytes([0; 32]), Fingerprint::from_bytes([1; 32]), Duration::from_secs(4));
    /// assert_eq!(request.lease().as_secs(), 4);
    /// ```
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Whether a completed record may be taken over.
    ///
    /// # Example
    /// ```
    /// # use std::time::Duration;
    /// # use tower_idempotency::{Fingerprint, RecordId, store::ClaimRequest};
    /// # let request = ClaimRequest::new(RecordId::from_bytes([0; 32]), Fingerprint::from_bytes([1; 32]), Duration::from_secs(4));
    /// assert!(!request.replace_completed());
    /// ```
    pub fn replace_completed(&self) -> bool {
        self.replace_completed
    }
}

/// The answer to a claim, in one store round trip.
///
/// # Example
/// ```
/// use tower_idempotency::{Fingerprint, store::Claim};
///
/// let claim = Claim::InFlight { fingerprint: Fingerprint::from_bytes([0; 32]) };
/// assert!(matches!(claim, Claim::InFlight { .. }));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Claim {
    /// The record was absent (or taken over): the caller now owns it.
    Acquired(Lease),
    /// Another request holds the record.
    InFlight {
        /// The fingerprint of the request that holds it.
        fingerprint: Fingerprint,
    },
    /// Another request holds the record, and its fingerprint is not the
    /// claimant's: what a store answers that compares fingerprints without
    /// keeping them where others can read them (the transactional
    /// PostgreSQL store). The layer answers it as a key reused (422).
    InFlightMismatch,
    /// The record is finished.
    Completed(Record),
}

/// The state of a record, as [`Store::lookup`] sees it.
///
/// # Example
/// ```
/// use tower_idempotency::{FencingToken, Fingerprint, store::RecordState};
///
/// let state = RecordState::InFlight {
///     fingerprint: Some(Fingerprint::from_bytes([0; 32])),
///     fencing_token: Some(FencingToken::new(1)),
/// };
/// assert!(matches!(state, RecordState::InFlight { .. }));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum RecordState {
    /// A request holds the record.
    InFlight {
        /// The fingerprint of the request that holds it, where the store
        /// keeps it with the claim. `None` from the transactional PostgreSQL
        /// store: its claims commit nothing until they complete.
        fingerprint: Option<Fingerprint>,
        /// The holder's fencing token, where the store keeps it with the
        /// claim. `None` from the Redis store (its claims leave the token to
        /// their owner alone: a `SET` in a transaction instead of a script,
        /// BENCHMARKS.md "Redis hot path") and the transactional PostgreSQL
        /// store.
        fencing_token: Option<FencingToken>,
    },
    /// The record is finished.
    Completed(Record),
}

/// A store call failed.
///
/// # Example
/// ```
/// use tower_idempotency::store::StoreError;
///
/// let error = StoreError::unavailable("connection refused");
/// assert!(error.to_string().contains("connection refused"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The caller no longer owns the record: its lease ran out and another
    /// request claimed it, or it was completed or released already.
    #[error("not the current owner of the record")]
    NotOwner,
    /// The store is full and refuses to grow.
    #[error("the store is full")]
    Full,
    /// The store did not answer within its timeout.
    #[error("the store did not answer within {0:?}")]
    Timeout(Duration),
    /// The store could not be reached or failed.
    #[error("the store is unavailable: {0}")]
    Unavailable(Box<dyn std::error::Error + Send + Sync>),
    /// The write was made, but fewer replicas than asked acknowledged it
    /// in time: a failover could still lose it.
    #[error("only {acknowledged} of {wanted} replicas acknowledged the write in time")]
    NotReplicated {
        /// Replicas that acknowledged.
        acknowledged: u32,
        /// Replicas asked for.
        wanted: u32,
    },
    /// The store held bytes that are not a record.
    #[error("the store holds a corrupt record: {0}")]
    Corrupt(#[from] crate::record::DecodeError),
    /// A completion that commits the inner service's writes was sent, and
    /// whether it committed could not be found out (the connection was lost
    /// and the database did not answer since). A retry with the same key is
    /// safe: it replays what committed, or runs again.
    #[error("the commit's outcome is unknown: {0}")]
    OutcomeUnknown(Box<dyn std::error::Error + Send + Sync>),
    /// The store refuses another waiting duplicate: as many wait as it
    /// allows. The duplicate is answered as in flight.
    #[error("too many duplicates wait already")]
    TooManyWaiting,
    /// The store did not answer in time while every connection of its pool
    /// was in use: the pool is too small for the requests in flight, not a
    /// store that is down.
    #[error("all {size} connections of the store's pool are busy")]
    PoolExhausted {
        /// The pool's size.
        size: u32,
    },
}

impl StoreError {
    /// An [`StoreError::Unavailable`] from any error.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::store::StoreError;
    /// let e = StoreError::unavailable(std::io::Error::other("down"));
    /// assert!(matches!(e, StoreError::Unavailable(_)));
    /// ```
    pub fn unavailable(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Unavailable(error.into())
    }
}

/// A place to keep records: in memory, in Redis, or anywhere that can claim a
/// key atomically.
///
/// Every method acts on one record in one round trip. `complete`, `release`
/// and `renew` act only for the current owner and return
/// [`StoreError::NotOwner`] otherwise, changing nothing.
///
/// # Example
/// ```
/// use std::time::Duration;
/// use tower_idempotency::{Fingerprint, RecordId, store::{Claim, ClaimRequest, MemoryStore, Store}};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let store = MemoryStore::new();
/// let request = ClaimRequest::new(RecordId::from_bytes([1; 32]), Fingerprint::from_bytes([2; 32]), Duration::from_secs(30));
/// let Claim::Acquired(lease) = store.claim(request).await.unwrap() else { panic!() };
/// assert!(matches!(store.claim(request).await.unwrap(), Claim::InFlight { .. }));
/// store.release(&request.id(), lease.owner()).await.unwrap();
/// # });
/// ```
pub trait Store: Send + Sync + 'static {
    /// Claims a record atomically: acquires it when absent (or completed and
    /// `replace_completed` is set), otherwise reports who holds it.
    fn claim(&self, request: ClaimRequest) -> impl Future<Output = Result<Claim, StoreError>> + Send;

    /// Stores `record` as the record's outcome, kept for `retention`.
    fn complete(
        &self,
        id: &RecordId,
        owner: OwnerToken,
        record: Record,
        retention: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Gives the claim up: the record becomes absent.
    fn release(&self, id: &RecordId, owner: OwnerToken) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Extends the claim to `lease` from now.
    fn renew(
        &self,
        id: &RecordId,
        owner: OwnerToken,
        lease: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Reads the record's state without changing it.
    fn lookup(&self, id: &RecordId) -> impl Future<Output = Result<Option<RecordState>, StoreError>> + Send;

    /// Called once by [`crate::IdempotencyLayer::new`] with the layer's
    /// counters, for what only the store sees: [`MemoryStore`] counts the
    /// records it drops to make room ([`crate::Outcome::Evicted`]). The
    /// default ignores them.
    fn report_to(&self, metrics: &Metrics) {
        let _ = metrics;
    }

    /// `Some(size)` when every connection of the store's pool is in use and
    /// the pool can grow no more: a call that timed out then reads as
    /// [`StoreError::PoolExhausted`], not as a store that is down. The
    /// default (a store without a pool of its own) says `None`.
    ///
    /// # Example
    /// ```
    /// use tower_idempotency::{Store, store::MemoryStore};
    ///
    /// assert_eq!(MemoryStore::new().pool_exhausted(), None);
    /// ```
    fn pool_exhausted(&self) -> Option<u32> {
        None
    }

    /// Adds to an executing request's extensions what its inner service
    /// needs of the claim `lease`: the
    /// [`TransactionalStore`](postgres::TransactionalStore) adds the request's
    /// transaction. The default adds nothing.
    fn attach(&self, lease: &Lease, extensions: &mut http::Extensions) {
        let _ = (lease, extensions);
    }

    /// Whether [`Store::complete`] commits the inner service's own writes
    /// with the record, and [`Store::release`] rolls them back (a
    /// transactional store). The layer then completes before the client
    /// gets any of the response, and when the completion fails it answers
    /// [`RejectionKind::NotCommitted`](crate::RejectionKind::NotCommitted)
    /// instead: nothing the request wrote was kept.
    ///
    /// Such a store's `complete` runs once, without the store timeout (a
    /// slow commit must still land): it bounds its own time, ends the claim
    /// whatever happens (the layer releases nothing after it), and returns
    /// [`StoreError::OutcomeUnknown`] for a commit it cannot tell landed
    /// ([`RejectionKind::CommitUnknown`](crate::RejectionKind::CommitUnknown)).
    /// The default is `false`.
    fn commits_handler_writes(&self) -> bool {
        false
    }

    /// Returns when the record `request` claimed, which was in flight, may
    /// have left that state, or after `timeout`. The caller then claims
    /// again to learn what happened; on an error it answers the duplicate as
    /// in flight ([`StoreError::TooManyWaiting`]: a store that holds a
    /// connection per waiter bounds them).
    ///
    /// The default polls no more often than every 50 ms; stores that can
    /// signal completion should override it.
    fn wait(&self, request: &ClaimRequest, timeout: Duration) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = request;
        async move {
            tokio::time::sleep(timeout.min(Duration::from_millis(50))).await;
            Ok(())
        }
    }

    /// Whether a claim's future may be dropped at any point without leaving
    /// the key held: the layer then drops a claim its request no longer
    /// waits for (the store timeout fired, the client went away) instead of
    /// finishing it on a task of its own to give the key back. The default
    /// is `false`.
    fn dropped_claims_hold_nothing(&self) -> bool {
        false
    }
}
