//! What a layer and every service it makes share: the store and the
//! settings, and the errors of setting them.

use std::{sync::Arc, time::Duration};

use http::{HeaderName, Method, Response, request::Parts};

use crate::{
    CompletedStrategy, FailureMode, InFlightPolicy, Metrics, RecordId, Rejection, RejectionKind, Responder,
    ResponseBody, Scope,
    policy::StoreIf,
    store::{OwnerToken, Store, StoreError},
    timeout::with_timeout,
};

pub(crate) type ScopeFn = dyn Fn(&Parts) -> Option<Scope> + Send + Sync;
pub(crate) type RequireFn = dyn Fn(&Parts) -> bool + Send + Sync;

/// A configuration value was out of range.
///
/// # Example
/// ```
/// use std::time::Duration;
/// use tower_idempotency::{ConfigError, IdempotencyLayer};
///
/// let error = IdempotencyLayer::memory().with_lease(Duration::ZERO).unwrap_err();
/// assert!(matches!(error, ConfigError::Zero("lease")));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A duration or size that must be positive was zero.
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    /// A duration is longer than [`MAX_DURATION`] (ten years): past what
    /// clocks and stores (Redis's `PX`) can add to now.
    #[error("{0} must be at most ten years")]
    TooLong(&'static str),
    /// A name (a PostgreSQL table's) is not a plain SQL identifier.
    #[error("the {0} name must be letters, digits and '_', at most 50 bytes, not starting with a digit")]
    InvalidName(&'static str),
}

/// The longest lease, ceiling, retention or timeout a layer accepts: ten
/// years.
///
/// # Example
/// ```
/// use tower_idempotency::{ConfigError, IdempotencyLayer, MAX_DURATION};
///
/// let error = IdempotencyLayer::memory().with_retention(MAX_DURATION * 2).unwrap_err();
/// assert_eq!(error, ConfigError::TooLong("retention"));
/// ```
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Everything a layer and its services share.
#[derive(Clone)]
pub(crate) struct Config<St> {
    pub(crate) store: St,
    pub(crate) methods: Vec<Method>,
    pub(crate) header: HeaderName,
    pub(crate) require: Option<Arc<RequireFn>>,
    pub(crate) scope: Arc<ScopeFn>,
    pub(crate) fingerprint_headers: Vec<HeaderName>,
    pub(crate) in_flight: InFlightPolicy,
    pub(crate) completed: CompletedStrategy,
    pub(crate) store_if: Arc<StoreIf>,
    pub(crate) lease: Duration,
    /// Whether claims take fencing tokens.
    pub(crate) fencing_tokens: bool,
    pub(crate) lease_ceiling: Duration,
    pub(crate) retention: Duration,
    pub(crate) body_limit: usize,
    pub(crate) body_timeout: Duration,
    pub(crate) response_limit: usize,
    pub(crate) store_timeout: Duration,
    pub(crate) retry_after: Duration,
    pub(crate) failure: FailureMode,
    pub(crate) responder: Arc<dyn Responder>,
    pub(crate) namespace: Arc<str>,
    pub(crate) metrics: Metrics,
}

impl<St: Store> Config<St> {
    /// Counts and logs a claim that failed, and says what failed: a timeout
    /// while every connection of the store's pool was busy is the pool's,
    /// not a store that is down.
    pub(crate) fn claim_failed(&self, id: &RecordId, error: StoreError) -> StoreError {
        let error = match (error, self.store.pool_exhausted()) {
            (StoreError::Timeout(_), Some(size)) => StoreError::PoolExhausted { size },
            (error, _) => error,
        };
        self.metrics.store_failed(id, "claim", &error);
        error
    }

    /// Gives the claim of `owner` back, under the store timeout; a failure
    /// is logged, as nobody waits for it.
    pub(crate) async fn release(&self, id: &RecordId, owner: OwnerToken) {
        if let Err(error) = with_timeout(self.store_timeout, self.store.release(id, owner)).await {
            self.metrics.store_failed(id, "release", &error);
        }
    }
}

impl<St> Config<St> {
    /// The response to a rejection of `kind`, counted.
    pub(crate) fn reject<B>(&self, kind: RejectionKind, grpc: bool) -> Response<ResponseBody<B>> {
        self.reject_with(Rejection::new(kind, grpc))
    }

    /// The response to `rejection`, counted, through the configured responder.
    pub(crate) fn reject_with<B>(&self, rejection: Rejection) -> Response<ResponseBody<B>> {
        self.metrics.count_rejection(rejection.kind());
        rejection.respond(&*self.responder, self.retry_after)
    }
}
