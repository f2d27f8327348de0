//! Counters per outcome, for the application to export.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use http::StatusCode;
use tokio::time::Instant;

use crate::{RecordId, RejectionKind, store::StoreError};

/// What happened to one guarded request.
///
/// # Example
/// ```
/// use tower_idempotency::Outcome;
///
/// assert_eq!(Outcome::Replayed.as_str(), "replayed");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// The inner service ran under a fresh claim.
    Executed,
    /// A stored response was replayed.
    Replayed,
    /// A duplicate arrived while the first request ran (409, 202, or a wait
    /// that timed out).
    InFlight,
    /// The key was reused for a different request (422).
    Mismatch,
    /// The request was refused before anything ran: missing or invalid key,
    /// missing scope, body too large or unreadable, reuse refused.
    Rejected,
    /// A store call failed or timed out.
    StoreError,
    /// The store failed and the request was forwarded unguarded.
    FailedOpen,
    /// A complete, release or renew found another owner: its lease had run
    /// out.
    StaleOwner,
    /// The store had no room for a new key (a memory store full of in-flight
    /// records): 503 `store-full`, nothing ran.
    StoreFull,
    /// A completed record was dropped before its retention ran out, to make
    /// room in a full memory store (counted per record): a retry of its key
    /// runs again.
    Evicted,
    /// The store did not answer in time while every connection of its pool
    /// was busy: 503 `pool-exhausted`, nothing ran. Size the pool for the
    /// requests in flight.
    PoolExhausted,
}

impl Outcome {
    /// Every outcome, in a fixed order.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::Outcome;
    /// assert!(Outcome::ALL.contains(&Outcome::Replayed));
    /// ```
    pub const ALL: &'static [Outcome] = &[
        Self::Executed,
        Self::Replayed,
        Self::InFlight,
        Self::Mismatch,
        Self::Rejected,
        Self::StoreError,
        Self::FailedOpen,
        Self::StaleOwner,
        Self::StoreFull,
        Self::Evicted,
        Self::PoolExhausted,
    ];

    /// A stable snake-case name, for metric labels.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::Outcome;
    /// assert_eq!(Outcome::StoreError.as_str(), "store_error");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Executed => "executed",
            Self::Replayed => "replayed",
            Self::InFlight => "in_flight",
            Self::Mismatch => "mismatch",
            Self::Rejected => "rejected",
            Self::StoreError => "store_error",
            Self::FailedOpen => "failed_open",
            Self::StaleOwner => "stale_owner",
            Self::StoreFull => "store_full",
            Self::Evicted => "evicted",
            Self::PoolExhausted => "pool_exhausted",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Why a store dropped a completed record before its retention ran out.
///
/// # Example
/// ```
/// use tower_idempotency::EvictionReason;
///
/// assert_eq!(EvictionReason::ScopeLimit.as_str(), "scope_limit");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EvictionReason {
    /// The store was full: the scope holding the most gave way.
    StoreFull,
    /// The scope was at the per-scope limit it was given
    /// ([`crate::store::MemoryStore::with_scope_limit`]).
    ScopeLimit,
}

impl EvictionReason {
    /// Every reason, in a fixed order.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::EvictionReason;
    /// assert_eq!(EvictionReason::ALL.len(), 2);
    /// ```
    pub const ALL: &'static [EvictionReason] = &[Self::StoreFull, Self::ScopeLimit];

    /// A stable snake-case name, for metric labels.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::EvictionReason;
    /// assert_eq!(EvictionReason::StoreFull.as_str(), "store_full");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Self::StoreFull => "store_full",
            Self::ScopeLimit => "scope_limit",
        }
    }
}

const COUNTERS: usize = 11;
const _: () = assert!(EvictionReason::ALL.len() == 2);
const _: () = assert!(Outcome::ALL.len() == COUNTERS);

/// Counters per [`Outcome`], shared by a layer and every service it made.
///
/// # Example
/// ```
/// use tower_idempotency::{IdempotencyLayer, Outcome};
///
/// let layer = IdempotencyLayer::memory();
/// let metrics = layer.metrics();
/// for &outcome in Outcome::ALL {
///     println!("idempotency_requests_total{{outcome=\"{}\"}} {}", outcome.as_str(), metrics.get(outcome));
/// }
/// ```
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    counters: Arc<[AtomicU64; COUNTERS]>,
    evictions: Arc<[AtomicU64; 2]>,
}

impl Metrics {
    /// How many requests had `outcome` so far.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, Outcome};
    /// assert_eq!(IdempotencyLayer::memory().metrics().get(Outcome::Executed), 0);
    /// ```
    pub fn get(&self, outcome: Outcome) -> u64 {
        self.counters[outcome.index()].load(Ordering::Relaxed)
    }

    /// Counts `outcome` (the request logs it once, at its end: see
    /// [`log_request`]).
    pub(crate) fn count(&self, outcome: Outcome) {
        self.counters[outcome.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// How many completed records stores dropped for `reason` so far (all
    /// reasons together: [`Outcome::Evicted`]).
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::{EvictionReason, IdempotencyLayer};
    /// assert_eq!(IdempotencyLayer::memory().metrics().evictions(EvictionReason::StoreFull), 0);
    /// ```
    pub fn evictions(&self, reason: EvictionReason) -> u64 {
        self.evictions[reason as usize].load(Ordering::Relaxed)
    }

    /// Counts records a store dropped to make room.
    pub(crate) fn count_evictions(&self, reason: EvictionReason, dropped: u64) {
        self.counters[Outcome::Evicted.index()].fetch_add(dropped, Ordering::Relaxed);
        self.evictions[reason as usize].fetch_add(dropped, Ordering::Relaxed);
    }

    /// Counts a rejection, as the outcome its kind stands for.
    pub(crate) fn count_rejection(&self, kind: RejectionKind) {
        if let Some(outcome) = rejection_outcome(kind) {
            self.count(outcome);
        }
    }

    /// Counts and logs a failed store call: a stale owner, or the store
    /// failing.
    pub(crate) fn store_failed(&self, id: &RecordId, call: &'static str, error: &StoreError) {
        if matches!(error, StoreError::NotOwner) {
            self.count(Outcome::StaleOwner);
            tracing::warn!(call, key = %id, "lease ran out before {call}: another request may own the key");
        } else if let StoreError::PoolExhausted { size } = error {
            self.count(Outcome::PoolExhausted);
            tracing::warn!(
                call,
                key = %id,
                size,
                "all {size} connections of the idempotency store's pool are busy: size the pool for the requests in flight (or look for slow statements holding them)"
            );
        } else {
            self.count(Outcome::StoreError);
            tracing::warn!(call, key = %id, %error, "idempotency store call failed");
        }
    }
}

/// The outcome a rejection counts as; `None` for those counted where they
/// happen (a store error, a panic).
fn rejection_outcome(kind: RejectionKind) -> Option<Outcome> {
    match kind {
        RejectionKind::KeyReused => Some(Outcome::Mismatch),
        RejectionKind::InFlight | RejectionKind::InFlightAccepted => Some(Outcome::InFlight),
        RejectionKind::StoreFull => Some(Outcome::StoreFull),
        RejectionKind::StoreUnavailable
        | RejectionKind::PoolExhausted { .. }
        | RejectionKind::HandlerPanicked
        | RejectionKind::NotCommitted
        | RejectionKind::CommitUnknown => None,
        _ => Some(Outcome::Rejected),
    }
}

/// What a rejection reads as in the request's log line.
pub(crate) fn rejection_label(kind: RejectionKind) -> &'static str {
    match kind {
        RejectionKind::StoreUnavailable => Outcome::StoreError.as_str(),
        RejectionKind::PoolExhausted { .. } => Outcome::PoolExhausted.as_str(),
        RejectionKind::HandlerPanicked | RejectionKind::NotCommitted | RejectionKind::CommitUnknown => {
            Outcome::Executed.as_str()
        }
        kind => rejection_outcome(kind).map_or("rejected", Outcome::as_str),
    }
}

/// When a guarded request started, for its log line: read from the clock
/// only when that line will be written.
pub(crate) fn request_started() -> Option<Instant> {
    tracing::enabled!(tracing::Level::DEBUG).then(Instant::now)
}

/// Logs what a guarded request came to, once, when its response (or the
/// head of a streaming one) is ready; the request's span names its key,
/// hashed. `started` is from [`request_started`]; `status` is `None` when
/// the inner service failed with an error. Nothing is computed unless the
/// line is written.
pub(crate) fn log_request(outcome: &'static str, status: Option<StatusCode>, started: Option<Instant>) {
    tracing::debug!(
        outcome,
        status = status.map(|status| status.as_u16()),
        elapsed_ms = started.map(|started| started.elapsed().as_secs_f64() * 1000.0),
        "idempotency request"
    );
}
