//! Idempotent work outside HTTP: a [`Guard`] runs a function at most once
//! per business key, for queue consumers, scheduled jobs and workflow
//! activities, over the same [`Store`]s as the layer.
//!
//! Brokers deliver at least once: a worker that charges a card and dies
//! before it acks gets the message again. [`Guard::run`] claims the key in
//! the store first; the first run executes the work and keeps its result;
//! a later run of the same key (a redelivery, a publisher's retry) gets that
//! result back as [`Outcome::Replayed`] without running the work, and one
//! that arrives while the first still runs is refused
//! ([`InFlight::Reject`], with the delay to retry after: a consumer naks
//! with it) or waits for its result ([`InFlight::Wait`]).
//!
//! - **Payload.** A run's payload is fingerprinted; a later run of the same
//!   key with another payload is [`GuardError::PayloadMismatch`], never a
//!   run (under `Rerun` as well: only a finished key runs again).
//!   [`Guard::run`] takes any `Serialize` payload and fingerprints its
//!   canonical JSON: `serde_json`'s encoding with every object's keys in
//!   byte order and no whitespace, so field order and map iteration order
//!   do not matter (SHA-256 over a version tag and that text). Numbers stay
//!   as `serde_json` writes them (`1` and `1.0` differ, an `f32` is widened,
//!   NaN becomes `null`), and a struct that gains a field changes the
//!   fingerprint of its payloads: for a message body as it came,
//!   [`Guard::run_bytes`] fingerprints the raw bytes.
//! - **Result.** The work's `Ok` value is kept as JSON (`serde_json`), in
//!   the store's ordinary record (status 200, `content-type:
//!   application/json`), so `lookup`, retention and every store work as for
//!   HTTP, and the format stays readable across versions of this crate and
//!   from other languages. A value that does not decode into the type a
//!   later run asks for is [`GuardError::Codec`]. A value that cannot be
//!   encoded (a map with keys that are not strings, say) is
//!   [`GuardError::Codec`] too, after the work ran: its key is then kept as
//!   run without a result ([`GuardError::NotKept`] to later runs), never run
//!   again.
//! - **Failure.** By default ([`Failure::Release`]) a work that returns
//!   `Err` gives its key back: the next delivery runs again.
//!   [`Failure::Record`] keeps the failure (its `Display` text, status 500)
//!   and replays it as [`GuardError::FailedBefore`]. On a store that
//!   commits the work's writes with the record (PostgreSQL's
//!   [`TransactionalStore`](crate::store::postgres::TransactionalStore)) a
//!   failure always rolls back, whatever the setting: its writes must not
//!   commit.
//! - **Lease.** The claim's lease is renewed while the work runs, up to the
//!   lease ceiling, as in the layer. [`Work::is_current`] turns false when
//!   the store has said another owner holds the key; pass
//!   [`Work::fencing_token`] to what the work writes so that a stale owner's
//!   writes can be refused. A completion by a stale owner changes nothing
//!   and is [`GuardError::LeaseLost`].
//! - **Cancellation and panics.** A run dropped before its work finished
//!   (a consumer shutting down) gives the key back, so a redelivery runs
//!   at once rather than after the lease; a cancelled run is no failure of
//!   the work, whatever [`Failure`] says. A panic in the work releases the
//!   key, or under [`Failure::Record`] records it, and then resumes
//!   unwinding.
//! - **Completed keys.** [`CompletedStrategy`] as in the layer:
//!   `Replay` (default), `Reject` ([`GuardError::AlreadyUsed`]), `Rerun`
//!   (a finished key runs again; only concurrent runs are refused, and a run
//!   that waited for another gets its result).
//! - **Namespace.** A guard's keys live in the namespace
//!   [`DEFAULT_NAMESPACE`], apart from an HTTP layer's on the same store.
//! - **No Tower form (yet).** A message service's key and payload come from
//!   the message in ways a generic layer would have to be told about each
//!   time; a closure around [`Guard::run`] says it in one line.
//!
//! As in the layer, a store that fails before it answered is an error
//! ([`GuardError::Store`]): nothing runs unguarded.

use std::{
    fmt,
    future::Future,
    panic::AssertUnwindSafe,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderMap, HeaderValue, StatusCode, header::CONTENT_TYPE};
use serde::{Serialize, de::DeserializeOwned};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::{
    CompletedStrategy, ConfigError, FencingToken, Fingerprint, IdempotencyKey, IdempotencyLayer, KeyError,
    MAX_DURATION, Metrics, NotStored, Outcome as Counted, Record, RecordId, Scope, StoredResponse,
    claim::{HeldClaim, PendingClaim},
    config::Config,
    store::{Claim, ClaimRequest, Lease, MemoryStore, Store, StoreError},
    timeout::with_timeout,
};

/// The namespace of a guard's keys unless [`Guard::with_namespace`] says
/// otherwise: apart from the layer's (whose default is empty), so that an
/// HTTP client sending `Idempotency-Key: order:o-1` to a service on the
/// same store can never take a worker's key.
pub const DEFAULT_NAMESPACE: &str = "guard";

/// Runs work at most once per key; see the [module docs](self).
///
/// # Example
/// ```
/// use tower_idempotency::guard::{Guard, Outcome};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let guard = Guard::memory();
/// let order = serde_json::json!({"order_id": "o-1", "amount": 500});
/// let charge = |_| async { Ok::<_, std::io::Error>(String::from("ch_1")) };
/// let first = guard.run("order:o-1", &order, charge).await.unwrap();
/// let again = guard.run("order:o-1", &order, |_| async { Ok::<String, std::io::Error>(String::from("ch_2")) }).await.unwrap();
/// assert_eq!(first, Outcome::Ran(String::from("ch_1")));
/// assert_eq!(again, Outcome::Replayed(String::from("ch_1")));
/// # });
/// ```
#[must_use]
pub struct Guard<St = MemoryStore> {
    layer: IdempotencyLayer<St>,
    in_flight: InFlight,
    failure: Failure,
}

impl<St> Clone for Guard<St> {
    fn clone(&self) -> Self {
        Self { layer: self.layer.clone(), in_flight: self.in_flight, failure: self.failure }
    }
}

impl<St> fmt::Debug for Guard<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard")
            .field("in_flight", &self.in_flight)
            .field("failure", &self.failure)
            .field("settings", &self.layer)
            .finish()
    }
}

/// What a run does when another run of its key is still in flight.
///
/// # Example
/// ```
/// use std::time::Duration;
/// use tower_idempotency::guard::{Guard, InFlight};
///
/// let guard = Guard::memory().on_in_flight(InFlight::Wait(Duration::from_secs(5)));
/// # drop(guard);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InFlight {
    /// Return [`GuardError::InFlight`] with the delay to retry after (the
    /// default): a consumer naks the message with it.
    #[default]
    Reject,
    /// Wait up to this long for the first run's result, without polling
    /// the store in a loop, and replay it.
    Wait(Duration),
}

/// What a run whose work returned `Err` leaves behind.
///
/// # Example
/// ```
/// use tower_idempotency::guard::{Failure, Guard};
///
/// let guard = Guard::memory().on_failure(Failure::Record);
/// # drop(guard);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Failure {
    /// Give the key back: the next run executes again (the default).
    #[default]
    Release,
    /// Keep the failure: later runs of the key get
    /// [`GuardError::FailedBefore`] with its message, and never run.
    Record,
}

/// What a successful run came to.
///
/// # Example
/// ```
/// use tower_idempotency::guard::Outcome;
///
/// let outcome = Outcome::Replayed(7);
/// assert!(outcome.is_replayed());
/// assert_eq!(outcome.into_inner(), 7);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<T> {
    /// The work ran now, and this is its result.
    Ran(T),
    /// An earlier run's kept result; the work did not run.
    Replayed(T),
}

impl<T> Outcome<T> {
    /// The result, ran or replayed.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::guard::Outcome;
    /// assert_eq!(Outcome::Ran("a").into_inner(), "a");
    /// ```
    pub fn into_inner(self) -> T {
        match self {
            Self::Ran(value) | Self::Replayed(value) => value,
        }
    }

    /// Whether the result was an earlier run's.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::guard::Outcome;
    /// assert!(!Outcome::Ran(()).is_replayed());
    /// ```
    pub fn is_replayed(&self) -> bool {
        matches!(self, Self::Replayed(_))
    }
}

/// Why a run did not produce a result.
///
/// # Example
/// ```
/// use tower_idempotency::guard::{Guard, GuardError};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let guard = Guard::memory();
/// let work = |_| async { Ok::<u32, std::io::Error>(1) };
/// guard.run("k", &"first payload", work).await.unwrap();
/// let other = guard.run("k", &"another payload", work).await.unwrap_err();
/// assert!(matches!(other, GuardError::PayloadMismatch));
/// # });
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GuardError<E> {
    /// The key is empty, too long or not printable ASCII.
    #[error("invalid idempotency key: {0}")]
    InvalidKey(KeyError),
    /// Another run of the key is in flight (or a wait for it ran out):
    /// retry after the delay given.
    #[error("another run of this key is in flight; retry after {retry_after:?}")]
    InFlight {
        /// When a retry may find the first run finished.
        retry_after: Duration,
    },
    /// The key was used before with another payload; nothing ran.
    #[error("the key was used before with another payload")]
    PayloadMismatch,
    /// The key finished before and [`CompletedStrategy::Reject`] refuses
    /// reuse.
    #[error("the key finished before and reuse is refused")]
    AlreadyUsed,
    /// The work ran, but another owner held the key by the time its result
    /// was to be kept (its lease ran out): the result was not kept, and the
    /// other owner's stands.
    #[error("the work ran, but the key had passed to another owner before its result was kept")]
    LeaseLost,
    /// An earlier run of the key failed, and [`Failure::Record`] kept its
    /// message; nothing ran.
    #[error("an earlier run of this key failed: {0}")]
    FailedBefore(String),
    /// An earlier run of the key finished but its result was not kept (the
    /// store was full, the result was larger than
    /// [`Guard::with_result_limit`], or it could not be encoded); it never
    /// runs again.
    #[error("an earlier run of this key finished, but its result was not kept")]
    NotKept,
    /// The store failed or did not answer in time; nothing ran, unless
    /// the store committed nothing of a run that did (a transactional
    /// store's failed commit: a retry runs again).
    #[error(transparent)]
    Store(StoreError),
    /// The payload could not be encoded, or a kept result not decoded into
    /// the type asked for; nothing ran.
    #[error("encoding: {0}")]
    Codec(String),
    /// The work ran, but its result could not be encoded as JSON (a map
    /// whose keys are not strings, say): the key is kept as run without a
    /// result, and later runs get [`GuardError::NotKept`].
    #[error("the work ran, but its result could not be encoded: {0}")]
    ResultNotEncoded(String),
    /// The work returned this error (under [`Failure::Release`] its key was
    /// given back).
    #[error("the work failed: {0}")]
    Failed(E),
}

/// What the work gets of its run.
///
/// # Example
/// ```
/// use tower_idempotency::guard::Guard;
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let token = Guard::memory()
///     .run("k", &(), |work| async move { Ok::<u64, std::io::Error>(work.fencing_token().get()) })
///     .await
///     .unwrap()
///     .into_inner();
/// assert!(token > 0);
/// # });
/// ```
pub struct Work {
    fencing_token: FencingToken,
    current: Arc<AtomicBool>,
    #[cfg_attr(not(feature = "postgres"), allow(dead_code, reason = "only the transaction is read from it"))]
    extensions: http::Extensions,
}

impl fmt::Debug for Work {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Work")
            .field("fencing_token", &self.fencing_token)
            .field("current", &self.is_current())
            .finish_non_exhaustive()
    }
}

impl Work {
    /// The claim's fencing token: it grows with every claim of the key, so
    /// a system the work writes to can refuse a write carrying a smaller
    /// one than it has seen.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::guard::Guard;
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let guard = Guard::memory();
    /// let ran = guard.run("k", &(), |work| async move { Ok::<_, std::io::Error>(work.fencing_token().get()) });
    /// assert_eq!(ran.await.unwrap().into_inner(), 1);
    /// # });
    /// ```
    pub fn fencing_token(&self) -> FencingToken {
        self.fencing_token
    }

    /// False once the store has said another owner holds the key (a
    /// renewal or a completion found it): the work should stop what it
    /// can, as its result will not be kept.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::guard::Guard;
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let guard = Guard::memory();
    /// let ran = guard.run("k", &(), |work| async move { Ok::<_, std::io::Error>(work.is_current()) });
    /// assert!(ran.await.unwrap().into_inner());
    /// # });
    /// ```
    pub fn is_current(&self) -> bool {
        self.current.load(Ordering::Relaxed)
    }

    /// The request's transaction on a store that commits the work's writes
    /// with its record (PostgreSQL's `TransactionalStore`): write through
    /// it, and the writes commit with the result or not at all. `None` on
    /// other stores.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::guard::Guard;
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let guard = Guard::memory();
    /// let ran = guard.run("k", &(), |work| async move { Ok::<_, std::io::Error>(work.transaction().is_none()) });
    /// assert!(ran.await.unwrap().into_inner());
    /// # });
    /// ```
    #[cfg(feature = "postgres")]
    pub fn transaction(&self) -> Option<crate::store::postgres::RequestTransaction> {
        self.extensions.get::<crate::store::postgres::RequestTransaction>().cloned()
    }
}

impl Guard<MemoryStore> {
    /// A guard on a fresh, bounded in-memory store: for one process, or
    /// for tests.
    ///
    /// # Example
    /// ```
    /// let guard = tower_idempotency::guard::Guard::memory();
    /// # drop(guard);
    /// ```
    pub fn memory() -> Self {
        Self::new(MemoryStore::new())
    }
}

impl<St: Store + Clone> Guard<St> {
    /// A guard on `store`, with the layer's defaults: a 30 s lease renewed
    /// up to 10 minutes, results kept 24 hours, a 1 s store timeout, fencing
    /// tokens, in-flight runs refused, failures released.
    ///
    /// # Example
    /// ```
    /// use tower_idempotency::{guard::Guard, store::MemoryStore};
    ///
    /// let guard = Guard::new(MemoryStore::with_limits(10_000, 16 << 20));
    /// # drop(guard);
    /// ```
    pub fn new(store: St) -> Self {
        let layer = IdempotencyLayer::new(store).with_namespace(DEFAULT_NAMESPACE);
        Self { layer, in_flight: InFlight::default(), failure: Failure::default() }
    }

    /// What a run does while another run of its key is in flight.
    ///
    /// # Example
    /// ```
    /// use tower_idempotency::guard::{Guard, InFlight};
    /// let guard = Guard::memory().on_in_flight(InFlight::Reject);
    /// # drop(guard);
    /// ```
    pub fn on_in_flight(mut self, policy: InFlight) -> Self {
        self.in_flight = policy;
        self
    }

    /// What a failed run leaves behind.
    ///
    /// # Example
    /// ```
    /// use tower_idempotency::guard::{Failure, Guard};
    /// let guard = Guard::memory().on_failure(Failure::Release);
    /// # drop(guard);
    /// ```
    pub fn on_failure(mut self, failure: Failure) -> Self {
        self.failure = failure;
        self
    }

    /// What a run of a key that finished before does (default: replay).
    ///
    /// # Example
    /// ```
    /// use tower_idempotency::{CompletedStrategy, guard::Guard};
    /// let guard = Guard::memory().with_completed(CompletedStrategy::Reject);
    /// # drop(guard);
    /// ```
    pub fn with_completed(mut self, strategy: CompletedStrategy) -> Self {
        self.layer = self.layer.with_completed(strategy);
        self
    }

    /// The lease of a claim, renewed while the work runs (as
    /// [`IdempotencyLayer::with_lease`]).
    ///
    /// # Example
    /// ```
    /// use std::time::Duration;
    /// let guard = tower_idempotency::guard::Guard::memory().with_lease(Duration::from_secs(10))?;
    /// # drop(guard);
    /// # Ok::<(), tower_idempotency::ConfigError>(())
    /// ```
    pub fn with_lease(mut self, lease: Duration) -> Result<Self, ConfigError> {
        self.layer = self.layer.with_lease(lease)?;
        Ok(self)
    }

    /// How long renewals may keep a claim, from its start (as
    /// [`IdempotencyLayer::with_lease_ceiling`]).
    ///
    /// # Example
    /// ```
    /// use std::time::Duration;
    /// let guard = tower_idempotency::guard::Guard::memory().with_lease_ceiling(Duration::from_secs(3600))?;
    /// # drop(guard);
    /// # Ok::<(), tower_idempotency::ConfigError>(())
    /// ```
    pub fn with_lease_ceiling(mut self, ceiling: Duration) -> Result<Self, ConfigError> {
        self.layer = self.layer.with_lease_ceiling(ceiling)?;
        Ok(self)
    }

    /// How long a result is kept (as [`IdempotencyLayer::with_retention`]).
    ///
    /// # Example
    /// ```
    /// use std::time::Duration;
    /// let guard = tower_idempotency::guard::Guard::memory().with_retention(Duration::from_secs(7 * 24 * 3600))?;
    /// # drop(guard);
    /// # Ok::<(), tower_idempotency::ConfigError>(())
    /// ```
    pub fn with_retention(mut self, retention: Duration) -> Result<Self, ConfigError> {
        self.layer = self.layer.with_retention(retention)?;
        Ok(self)
    }

    /// How long a store call may take (as
    /// [`IdempotencyLayer::with_store_timeout`]).
    ///
    /// # Example
    /// ```
    /// use std::time::Duration;
    /// let guard = tower_idempotency::guard::Guard::memory().with_store_timeout(Duration::from_millis(500))?;
    /// # drop(guard);
    /// # Ok::<(), tower_idempotency::ConfigError>(())
    /// ```
    pub fn with_store_timeout(mut self, timeout: Duration) -> Result<Self, ConfigError> {
        self.layer = self.layer.with_store_timeout(timeout)?;
        Ok(self)
    }

    /// The largest result, as JSON, that is kept (default 1 MiB, as the
    /// layer's response limit): a larger one is returned to the run that
    /// made it, and later runs get [`GuardError::NotKept`].
    ///
    /// # Example
    /// ```
    /// let guard = tower_idempotency::guard::Guard::memory().with_result_limit(64 << 10);
    /// # drop(guard);
    /// ```
    pub fn with_result_limit(mut self, bytes: usize) -> Self {
        self.layer = self.layer.with_response_limit(bytes);
        self
    }

    /// Keeps this guard's keys apart from other users' of the same store
    /// (as [`IdempotencyLayer::with_namespace`]; default
    /// [`DEFAULT_NAMESPACE`]).
    ///
    /// # Example
    /// ```
    /// let guard = tower_idempotency::guard::Guard::memory().with_namespace("orders");
    /// # drop(guard);
    /// ```
    pub fn with_namespace(mut self, namespace: &str) -> Self {
        self.layer = self.layer.with_namespace(namespace);
        self
    }

    /// The guard's counters per outcome (`executed`, `replayed`,
    /// `in_flight`, `mismatch`, ...), as the layer's.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::{Outcome, guard::Guard};
    /// assert_eq!(Guard::memory().metrics().get(Outcome::Executed), 0);
    /// ```
    pub fn metrics(&self) -> Metrics {
        self.layer.metrics()
    }

    /// Runs `work` once for `key` (in the shared anonymous scope) and
    /// `payload`: see the [module docs](self).
    ///
    /// # Example
    /// ```
    /// use tower_idempotency::guard::{Guard, Outcome};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let guard = Guard::memory();
    /// let ran = guard.run("payment:o-9", &("o-9", 500), |_| async { Ok::<_, std::io::Error>(9) }).await.unwrap();
    /// assert_eq!(ran, Outcome::Ran(9));
    /// # });
    /// ```
    pub async fn run<P, T, E, F, Fut>(&self, key: &str, payload: &P, work: F) -> Result<Outcome<T>, GuardError<E>>
    where
        P: Serialize + ?Sized,
        T: Serialize + DeserializeOwned,
        E: fmt::Display,
        F: FnOnce(Work) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.run_in(&Scope::anonymous(), key, payload, work).await
    }

    /// [`Guard::run`] within `scope` (a tenant): two scopes never share a
    /// key.
    ///
    /// # Example
    /// ```
    /// use tower_idempotency::{Scope, guard::Guard};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let guard = Guard::memory();
    /// let work = |_| async { Ok::<_, std::io::Error>(1) };
    /// guard.run_in(&Scope::new("tenant-a"), "k", &(), work).await.unwrap();
    /// assert!(!guard.run_in(&Scope::new("tenant-b"), "k", &(), work).await.unwrap().is_replayed());
    /// # });
    /// ```
    pub async fn run_in<P, T, E, F, Fut>(
        &self,
        scope: &Scope,
        key: &str,
        payload: &P,
        work: F,
    ) -> Result<Outcome<T>, GuardError<E>>
    where
        P: Serialize + ?Sized,
        T: Serialize + DeserializeOwned,
        E: fmt::Display,
        F: FnOnce(Work) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let value = serde_json::to_value(payload).map_err(|error| GuardError::Codec(error.to_string()))?;
        let mut canonical = Vec::new();
        write_canonical(&value, &mut canonical).map_err(|error| GuardError::Codec(error.to_string()))?;
        let fingerprint = fingerprint(b"tower-idempotency guard json v1\0", &canonical);
        self.run_fingerprinted(scope, key, fingerprint, work).await
    }

    /// [`Guard::run_in`] with a payload of raw bytes (a message body as it
    /// came), fingerprinted as they are.
    ///
    /// # Example
    /// ```
    /// use tower_idempotency::{Scope, guard::Guard};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let guard = Guard::memory();
    /// let body = br#"{"order_id":"o-1"}"#;
    /// let scope = Scope::anonymous();
    /// let ran = guard.run_bytes(&scope, "order:o-1", body, |_| async { Ok::<_, std::io::Error>(()) });
    /// assert!(!ran.await.unwrap().is_replayed());
    /// # });
    /// ```
    pub async fn run_bytes<T, E, F, Fut>(
        &self,
        scope: &Scope,
        key: &str,
        payload: &[u8],
        work: F,
    ) -> Result<Outcome<T>, GuardError<E>>
    where
        T: Serialize + DeserializeOwned,
        E: fmt::Display,
        F: FnOnce(Work) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let fingerprint = fingerprint(b"tower-idempotency guard bytes v1\0", payload);
        self.run_fingerprinted(scope, key, fingerprint, work).await
    }

    async fn run_fingerprinted<T, E, F, Fut>(
        &self,
        scope: &Scope,
        key: &str,
        fingerprint: Fingerprint,
        work: F,
    ) -> Result<Outcome<T>, GuardError<E>>
    where
        T: Serialize + DeserializeOwned,
        E: fmt::Display,
        F: FnOnce(Work) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let key: IdempotencyKey = key.parse().map_err(GuardError::InvalidKey)?;
        let config = self.layer.config();
        let id = RecordId::new(&config.namespace, scope, &key);
        let wait_until = match self.in_flight {
            InFlight::Wait(timeout) => Some(Instant::now() + timeout.min(MAX_DURATION)),
            InFlight::Reject => None,
        };
        let in_flight = || {
            config.metrics.count(Counted::InFlight);
            GuardError::InFlight { retry_after: config.retry_after }
        };
        let mismatch = || {
            config.metrics.count(Counted::Mismatch);
            GuardError::PayloadMismatch
        };
        let mut replace_completed = config.completed == CompletedStrategy::Rerun;
        // A run that waited for another replays its result, even under `Rerun`.
        let mut waited = false;
        loop {
            let request = ClaimRequest::new(id, fingerprint, config.lease)
                .with_replace_completed(replace_completed)
                .with_fencing_token(config.fencing_tokens)
                .with_scope(scope);
            let claimed = match with_timeout(config.store_timeout, PendingClaim::new(config, request)).await {
                Ok(claimed) => claimed,
                Err(StoreError::Full) => {
                    config.metrics.count(Counted::StoreFull);
                    return Err(GuardError::Store(StoreError::Full));
                }
                Err(error) => return Err(GuardError::Store(config.claim_failed(&id, error))),
            };
            match claimed {
                Claim::Acquired(lease) => return self.execute(config, id, fingerprint, lease, work).await,
                Claim::InFlight { fingerprint: theirs } if theirs != fingerprint => return Err(mismatch()),
                Claim::InFlightMismatch => return Err(mismatch()),
                Claim::InFlight { .. } => {
                    let now = Instant::now();
                    let Some(deadline) = wait_until.filter(|&deadline| deadline > now) else { return Err(in_flight()) };
                    (replace_completed, waited) = (false, true);
                    let wait = config.store.wait(&request, deadline - now);
                    if let Ok(Err(error)) = Box::pin(tokio::time::timeout_at(deadline, wait)).await {
                        tracing::debug!(%error, "a run could not wait for the run in flight");
                        return Err(in_flight());
                    }
                }
                Claim::Completed(record) if record.fingerprint() != fingerprint => return Err(mismatch()),
                Claim::Completed(_) if config.completed == CompletedStrategy::Reject => {
                    config.metrics.count(Counted::Rejected);
                    return Err(GuardError::AlreadyUsed);
                }
                Claim::Completed(_) if config.completed == CompletedStrategy::Rerun && !waited => {
                    replace_completed = true;
                }
                Claim::Completed(record) => {
                    let replayed = replay(record);
                    config.metrics.count(if replayed.is_ok() { Counted::Replayed } else { Counted::Rejected });
                    return replayed.map(Outcome::Replayed);
                }
            }
        }
    }

    async fn execute<T, E, F, Fut>(
        &self,
        config: &Arc<Config<St>>,
        id: RecordId,
        fingerprint: Fingerprint,
        lease: Lease,
        work: F,
    ) -> Result<Outcome<T>, GuardError<E>>
    where
        T: Serialize + DeserializeOwned,
        E: fmt::Display,
        F: FnOnce(Work) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        config.metrics.count(Counted::Executed);
        let mut claim = HeldClaim::new(config.clone(), id, lease.owner(), fingerprint);
        let current = claim.ownership();
        let mut extensions = http::Extensions::new();
        config.store.attach(&lease, &mut extensions);
        let handle = Work { fencing_token: lease.fencing_token(), current: current.clone(), extensions };
        let transactional = config.store.commits_handler_writes();
        // A panic (in the closure or its future) is caught only to settle
        // the key, then resumed.
        let ran = claim.while_renewing(AssertUnwindSafe(async move { work(handle).await }).catch_unwind()).await;
        let failed = |message: &str| {
            let body = Bytes::copy_from_slice(message.as_bytes());
            let keep = self.failure == Failure::Record && !transactional;
            keep.then(|| Record::new(fingerprint, kept(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", body)))
        };
        let value = match ran {
            Ok(Ok(value)) => value,
            Ok(Err(error)) => {
                settle(claim, failed(&error.to_string())).await.map_err(GuardError::Store)?;
                return Err(GuardError::Failed(error));
            }
            Err(panic) => {
                // Settled before unwinding on: the task is detached.
                let _ = settle(claim, failed("the work panicked")).await;
                std::panic::resume_unwind(panic);
            }
        };
        let (record, encoded) = match serde_json::to_vec(&value) {
            // Kept as run, without a result: later runs get `NotKept`.
            Ok(body) if body.len() > config.response_limit => {
                (Record::not_stored(fingerprint, NotStored::TooLarge), Ok(()))
            }
            Ok(body) => (Record::new(fingerprint, kept(StatusCode::OK, "application/json", body.into())), Ok(())),
            // The work ran: its key must not run again, though there is no
            // result to keep.
            Err(error) => (Record::not_stored(fingerprint, NotStored::Unreadable), Err(error.to_string())),
        };
        settle(claim, Some(record)).await.map_err(GuardError::Store)?;
        if !current.load(Ordering::Relaxed) {
            return Err(GuardError::LeaseLost);
        }
        encoded.map_err(GuardError::ResultNotEncoded)?;
        Ok(Outcome::Ran(value))
    }
}

/// Ends a run's claim: keeps `record` (completing it, or committing it on a
/// transactional store), or without one gives the key back. On a task of
/// its own, awaited: a caller that stops waiting (a timeout, a shutdown)
/// cannot leave the key held until its lease ends, or lose a result the
/// work produced.
async fn settle<St: Store>(mut claim: HeldClaim<St>, record: Option<Record>) -> Result<(), StoreError> {
    let settling = tokio::spawn(async move {
        match record {
            None => {
                claim.release().await;
                Ok(())
            }
            Some(record) if claim.config.store.commits_handler_writes() => claim.commit(record).await,
            Some(record) => {
                let unsaved = claim.complete_with(|| record.clone()).await;
                claim.retry_completion(unsaved).await;
                Ok(())
            }
        }
    });
    settling.await.unwrap_or_else(|error| Err(StoreError::unavailable(error)))
}

/// A kept result or failure, as a stored response.
fn kept(status: StatusCode, content_type: &'static str, body: Bytes) -> StoredResponse {
    let mut headers = HeaderMap::with_capacity(1);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    StoredResponse::new(status, headers, body, None)
}

/// The result an earlier run kept, or its kept failure.
fn replay<T: DeserializeOwned, E>(record: Record) -> Result<T, GuardError<E>> {
    let Ok(response) = record.into_response() else { return Err(GuardError::NotKept) };
    if response.status() != StatusCode::OK {
        return Err(GuardError::FailedBefore(String::from_utf8_lossy(response.body()).into_owned()));
    }
    serde_json::from_slice(response.body()).map_err(|error| GuardError::Codec(error.to_string()))
}

fn fingerprint(tag: &[u8], payload: &[u8]) -> Fingerprint {
    let mut hasher = Sha256::new();
    hasher.update(tag);
    hasher.update(payload);
    Fingerprint::from_bytes(hasher.finalize().into())
}

/// `value` as JSON with every object's keys in byte order, no whitespace.
fn write_canonical(value: &serde_json::Value, out: &mut Vec<u8>) -> serde_json::Result<()> {
    match value {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_unstable_by(|(a, _), (b, _)| a.as_bytes().cmp(b.as_bytes()));
            out.push(b'{');
            for (n, (key, value)) in entries.into_iter().enumerate() {
                if n > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, key)?;
                out.push(b':');
                write_canonical(value, out)?;
            }
            out.push(b'}');
        }
        serde_json::Value::Array(values) => {
            out.push(b'[');
            for (n, value) in values.iter().enumerate() {
                if n > 0 {
                    out.push(b',');
                }
                write_canonical(value, out)?;
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_orders_keys_and_drops_whitespace() {
        let a: serde_json::Value = serde_json::from_str(r#"{"b": 1, "a": {"y": [1, 2], "x": "s"}}"#).unwrap();
        let mut out = Vec::new();
        write_canonical(&a, &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), r#"{"a":{"x":"s","y":[1,2]},"b":1}"#);
    }
}
