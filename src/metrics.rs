//! Counters per outcome, for the application to export.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

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
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

const COUNTERS: usize = 10;
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

    fn add(&self, outcome: Outcome) {
        self.counters[outcome.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts and logs `outcome` for the record `id`.
    pub(crate) fn count(&self, outcome: Outcome, id: &RecordId) {
        self.add(outcome);
        tracing::debug!(outcome = outcome.as_str(), key = %id, "idempotency outcome");
    }

    /// Counts records a store dropped to make room.
    pub(crate) fn count_evictions(&self, dropped: u64) {
        self.counters[Outcome::Evicted.index()].fetch_add(dropped, Ordering::Relaxed);
    }

    /// Counts and logs a rejection, as the outcome its kind stands for.
    pub(crate) fn count_rejection(&self, kind: RejectionKind) {
        let outcome = match kind {
            RejectionKind::KeyReused => Outcome::Mismatch,
            RejectionKind::InFlight | RejectionKind::InFlightAccepted => Outcome::InFlight,
            RejectionKind::StoreFull => Outcome::StoreFull,
            // Counted where they happen, as a store error or a panic.
            RejectionKind::StoreUnavailable | RejectionKind::HandlerPanicked => return,
            _ => Outcome::Rejected,
        };
        self.add(outcome);
        tracing::debug!(outcome = outcome.as_str(), rejection = kind.problem_type(), "idempotency outcome");
    }

    /// Counts and logs a failed store call: a stale owner, or the store
    /// failing.
    pub(crate) fn store_failed(&self, id: &RecordId, call: &'static str, error: &StoreError) {
        if matches!(error, StoreError::NotOwner) {
            self.add(Outcome::StaleOwner);
            tracing::warn!(call, key = %id, "lease ran out before {call}: another request may own the key");
        } else {
            self.add(Outcome::StoreError);
            tracing::warn!(call, key = %id, %error, "idempotency store call failed");
        }
    }
}
