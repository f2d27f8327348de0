//! [`IdempotencyLayer`]: its constructors, one per store, and its
//! settings.

use std::{fmt, sync::Arc, time::Duration};

use http::{HeaderName, Method, StatusCode, request::Parts};
use tower_layer::Layer;

#[cfg(feature = "redis")]
use crate::store::redis::{RedisClusterStore, RedisStore, deadpool_redis};
use crate::{
    CompletedStrategy, FailureMode, IdempotencyKey, InFlightPolicy, Metrics, RecordId, Responder, Scope,
    config::{Config, ConfigError, MAX_DURATION, RequireFn},
    policy::default_store_rule,
    response::DefaultResponder,
    service::Idempotency,
    store::{MemoryStore, RecordState, Store, StoreError},
    timeout::with_timeout,
};

/// Makes retried requests safe: the first request with an `Idempotency-Key`
/// runs, every later one with the same key gets its recorded response.
///
/// The layer is its configuration: start from [`IdempotencyLayer::memory`] or
/// [`IdempotencyLayer::new`] and chain `with_*` setters. Clones share the
/// store and the [`Metrics`].
///
/// | setting | default |
/// |---|---|
/// | guarded methods | `POST`, `PATCH` |
/// | key header | `Idempotency-Key` |
/// | key required | no: requests without one pass through |
/// | scope | SHA-256 of `Authorization` ([`Scope::from_authorization`]); none: 400 |
/// | fingerprinted headers | `content-type` |
/// | in-flight duplicates | [`InFlightPolicy::Conflict`] (409) |
/// | finished keys | [`CompletedStrategy::Replay`] |
/// | stored responses | all but 5xx, 408, 425, 429 |
/// | lease / renewal ceiling / retention | 30 s / 10 min / 24 h |
/// | request body cap / response storage cap | 1 MiB / 1 MiB |
/// | request body timeout | 30 s |
/// | store call timeout | 1 s |
/// | store failure | [`FailureMode::FailClosed`] (503) |
///
/// # Example
/// ```
/// use std::time::Duration;
/// use axum::{Router, routing::post};
/// use tower_idempotency::{IdempotencyLayer, InFlightPolicy};
///
/// let layer = IdempotencyLayer::memory()
///     .with_in_flight(InFlightPolicy::Wait(Duration::from_secs(10)))
///     .with_retention(Duration::from_secs(48 * 3600))
///     .unwrap();
/// let app: Router = Router::new().route("/charges", post(|| async { "charged" }).route_layer(layer));
/// # drop(app);
/// ```
#[must_use]
pub struct IdempotencyLayer<St = MemoryStore> {
    config: Arc<Config<St>>,
}

impl<St> Clone for IdempotencyLayer<St> {
    fn clone(&self) -> Self {
        Self { config: self.config.clone() }
    }
}

impl<St> fmt::Debug for IdempotencyLayer<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("methods", &self.config.methods)
            .field("header", &self.config.header)
            .field("in_flight", &self.config.in_flight)
            .field("completed", &self.config.completed)
            .field("lease", &self.config.lease)
            .field("retention", &self.config.retention)
            .finish_non_exhaustive()
    }
}

impl IdempotencyLayer<MemoryStore> {
    /// A layer with a fresh, bounded in-memory store ([`MemoryStore::new`]):
    /// for one process, or for tests.
    ///
    /// # Example
    /// ```
    /// let layer = tower_idempotency::IdempotencyLayer::memory();
    /// # drop(layer);
    /// ```
    pub fn memory() -> Self {
        Self::new(MemoryStore::new())
    }
}

#[cfg(feature = "redis")]
impl IdempotencyLayer<RedisStore> {
    /// A layer on one Redis, shared by every instance of the application.
    ///
    /// # Example
    /// ```no_run
    /// use tower_idempotency::{IdempotencyLayer, store::redis::deadpool_redis};
    ///
    /// let pool = deadpool_redis::Config::from_url("redis://127.0.0.1:6379")
    ///     .create_pool(Some(deadpool_redis::Runtime::Tokio1))
    ///     .unwrap();
    /// let layer = IdempotencyLayer::redis(pool);
    /// # drop(layer);
    /// ```
    pub fn redis(pool: deadpool_redis::Pool) -> Self {
        Self::new(RedisStore::new(pool))
    }
}

#[cfg(feature = "redis")]
impl IdempotencyLayer<RedisClusterStore> {
    /// A layer on a Redis Cluster.
    ///
    /// # Example
    /// ```no_run
    /// use tower_idempotency::{IdempotencyLayer, store::redis::deadpool_redis};
    ///
    /// let urls = vec!["redis://127.0.0.1:7000".to_owned(), "redis://127.0.0.1:7001".to_owned()];
    /// let pool = deadpool_redis::cluster::Config::from_urls(urls)
    ///     .create_pool(Some(deadpool_redis::Runtime::Tokio1))
    ///     .unwrap();
    /// let layer = IdempotencyLayer::redis_cluster(pool);
    /// # drop(layer);
    /// ```
    pub fn redis_cluster(pool: deadpool_redis::cluster::Pool) -> Self {
        Self::new(RedisStore::new(pool))
    }
}

#[cfg(feature = "postgres")]
impl IdempotencyLayer<crate::store::postgres::TransactionalStore> {
    /// A layer on PostgreSQL in transactional mode
    /// ([`TransactionalStore`](crate::store::postgres::TransactionalStore)), in the table
    /// `idempotency_records` (create it with
    /// [`TransactionalStore::migrate`](crate::store::postgres::TransactionalStore::migrate)):
    /// each guarded request writes in its
    /// [`RequestTransaction`](crate::store::postgres::RequestTransaction),
    /// which commits with its record before the client gets the response.
    /// `IdempotencyLayer::new(PostgresStore::new(pool))` keeps records
    /// without transactions.
    ///
    /// # Example
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, store::postgres::sqlx::PgPool};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let pool = PgPool::connect_lazy("postgres://postgres@127.0.0.1/app").unwrap();
    /// let layer = IdempotencyLayer::postgres(pool);
    /// # drop(layer);
    /// # });
    /// ```
    pub fn postgres(pool: sqlx::PgPool) -> Self {
        Self::new(crate::store::postgres::TransactionalStore::new(pool))
    }
}

impl<St: Store + Clone> IdempotencyLayer<St> {
    /// A layer over any [`Store`], with the default configuration.
    ///
    /// # Example
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, store::MemoryStore};
    ///
    /// let layer = IdempotencyLayer::new(MemoryStore::with_limits(1_000, 16 << 20));
    /// # drop(layer);
    /// ```
    pub fn new(store: St) -> Self {
        let metrics = Metrics::default();
        store.report_to(&metrics);
        Self {
            config: Arc::new(Config {
                store,
                methods: vec![Method::POST, Method::PATCH],
                header: HeaderName::from_static("idempotency-key"),
                require: None,
                scope: Arc::new(Scope::from_authorization),
                fingerprint_headers: vec![http::header::CONTENT_TYPE],
                in_flight: InFlightPolicy::default(),
                completed: CompletedStrategy::default(),
                store_if: Arc::new(default_store_rule),
                lease: Duration::from_secs(30),
                lease_ceiling: Duration::from_secs(600),
                fencing_tokens: true,
                retention: Duration::from_secs(24 * 3600),
                body_limit: 1 << 20,
                body_timeout: Duration::from_secs(30),
                response_limit: 1 << 20,
                store_timeout: Duration::from_secs(1),
                retry_after: Duration::from_secs(1),
                failure: FailureMode::default(),
                responder: Arc::new(DefaultResponder),
                namespace: Arc::from(""),
                metrics,
            }),
        }
    }

    /// The settings the layer's services share (the worker guard runs on
    /// them too).
    #[cfg(feature = "guard")]
    pub(crate) fn config(&self) -> &Arc<Config<St>> {
        &self.config
    }

    fn update(mut self, f: impl FnOnce(&mut Config<St>)) -> Self {
        f(Arc::make_mut(&mut self.config));
        self
    }

    /// The methods that are guarded; requests with other methods pass
    /// through untouched.
    ///
    /// # Example
    /// ```
    /// use axum::http::Method;
    /// let layer = tower_idempotency::IdempotencyLayer::memory().with_methods([Method::POST, Method::PUT, Method::DELETE]);
    /// # drop(layer);
    /// ```
    pub fn with_methods(self, methods: impl IntoIterator<Item = Method>) -> Self {
        let methods = methods.into_iter().collect();
        self.update(|c| c.methods = methods)
    }

    /// The header that carries the key (gRPC metadata uses the same name).
    ///
    /// # Example
    /// ```
    /// use axum::http::HeaderName;
    /// let layer = tower_idempotency::IdempotencyLayer::memory().with_header(HeaderName::from_static("x-request-key"));
    /// # drop(layer);
    /// ```
    pub fn with_header(self, name: HeaderName) -> Self {
        self.update(|c| c.header = name)
    }

    /// Whether every guarded request must carry a key: without one it gets
    /// 400 `missing-key`.
    ///
    /// # Example
    /// ```
    /// let layer = tower_idempotency::IdempotencyLayer::memory().with_key_required(true);
    /// # drop(layer);
    /// ```
    pub fn with_key_required(self, required: bool) -> Self {
        self.update(|c| c.require = required.then(|| Arc::new(|_: &Parts| true) as Arc<RequireFn>))
    }

    /// Requires a key on the guarded requests for which `predicate` is true.
    ///
    /// # Example
    /// ```
    /// let layer = tower_idempotency::IdempotencyLayer::memory()
    ///     .with_key_required_if(|parts: &axum::http::request::Parts| parts.uri.path().starts_with("/v1/charges"));
    /// # drop(layer);
    /// ```
    pub fn with_key_required_if(self, predicate: impl Fn(&Parts) -> bool + Send + Sync + 'static) -> Self {
        self.update(|c| c.require = Some(Arc::new(predicate)))
    }

    /// Who a key belongs to. Return `None` when the request carries no
    /// identity: it then gets 400 `missing-scope` and nothing runs.
    ///
    /// # Example
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, Scope};
    ///
    /// #[derive(Clone)]
    /// struct Tenant(String);
    ///
    /// let layer = IdempotencyLayer::memory().with_scope(|parts: &axum::http::request::Parts| {
    ///     parts.extensions.get::<Tenant>().map(|tenant| Scope::new(tenant.0.clone()))
    /// });
    /// # drop(layer);
    /// ```
    pub fn with_scope(self, scope: impl Fn(&Parts) -> Option<Scope> + Send + Sync + 'static) -> Self {
        self.update(|c| c.scope = Arc::new(scope))
    }

    /// The headers that count in the fingerprint besides method, path, query
    /// and body (default: `content-type`).
    ///
    /// # Example
    /// ```
    /// use axum::http::header::{ACCEPT, CONTENT_TYPE};
    /// let layer = tower_idempotency::IdempotencyLayer::memory().with_fingerprint_headers([CONTENT_TYPE, ACCEPT]);
    /// # drop(layer);
    /// ```
    pub fn with_fingerprint_headers(self, headers: impl IntoIterator<Item = HeaderName>) -> Self {
        let headers = headers.into_iter().collect();
        self.update(|c| c.fingerprint_headers = headers)
    }

    /// Whether claims take fencing tokens (default `true`). A handler that
    /// never passes [`IdempotencyContext::fencing_token`](crate::IdempotencyContext::fencing_token) downstream does not
    /// need them, and without them a Redis claim is one `SET … NX GET`, not a
    /// transaction that also increments a counter (BENCHMARKS.md has the
    /// figures). The context's token is then 0.
    ///
    /// # Example
    /// ```
    /// let layer = tower_idempotency::IdempotencyLayer::memory().with_fencing_tokens(false);
    /// # drop(layer);
    /// ```
    pub fn with_fencing_tokens(self, enabled: bool) -> Self {
        self.update(|c| c.fencing_tokens = enabled)
    }

    /// What duplicates get while the first request runs.
    ///
    /// # Example
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, InFlightPolicy};
    /// let layer = IdempotencyLayer::memory().with_in_flight(InFlightPolicy::accepted());
    /// # drop(layer);
    /// ```
    pub fn with_in_flight(self, policy: InFlightPolicy) -> Self {
        self.update(|c| c.in_flight = policy)
    }

    /// What requests get once their key's first request finished.
    ///
    /// # Example
    /// ```
    /// use tower_idempotency::{CompletedStrategy, IdempotencyLayer};
    /// let layer = IdempotencyLayer::memory().with_completed(CompletedStrategy::Rerun);
    /// # drop(layer);
    /// ```
    pub fn with_completed(self, strategy: CompletedStrategy) -> Self {
        self.update(|c| c.completed = strategy)
    }

    /// Which responses are stored, by status. gRPC responses are judged by
    /// their `grpc-status`, mapped to HTTP by [`crate::policy::grpc_to_http`].
    /// A [`crate::StoreResponse`] in the response's extensions overrules it.
    ///
    /// # Example
    /// ```
    /// // Store only successes; let every error run again on retry.
    /// let layer = tower_idempotency::IdempotencyLayer::memory().with_store_if(|status| status.is_success());
    /// # drop(layer);
    /// ```
    pub fn with_store_if(self, predicate: impl Fn(StatusCode) -> bool + Send + Sync + 'static) -> Self {
        self.update(|c| c.store_if = Arc::new(predicate))
    }

    /// How long a claim lives without renewal. While the inner service runs
    /// the lease is renewed every third of it, up to the lease ceiling.
    ///
    /// # Example
    /// ```
    /// use std::time::Duration;
    /// let layer = tower_idempotency::IdempotencyLayer::memory().with_lease(Duration::from_secs(10)).unwrap();
    /// # drop(layer);
    /// ```
    pub fn with_lease(self, lease: Duration) -> Result<Self, ConfigError> {
        let lease = check_duration("lease", lease)?;
        Ok(self.update(|c| c.lease = lease))
    }

    /// How long a request may hold its key through renewals. A handler still
    /// running after this loses its claim one lease later, and a duplicate
    /// may then run. A ceiling shorter than the lease means no renewal at
    /// all; the order in which lease and ceiling are set does not matter.
    ///
    /// # Example
    /// ```
    /// use std::time::Duration;
    /// let layer = tower_idempotency::IdempotencyLayer::memory().with_lease_ceiling(Duration::from_secs(120)).unwrap();
    /// # drop(layer);
    /// ```
    pub fn with_lease_ceiling(self, ceiling: Duration) -> Result<Self, ConfigError> {
        let ceiling = check_duration("lease ceiling", ceiling)?;
        Ok(self.update(|c| c.lease_ceiling = ceiling))
    }

    /// How long a completed record is kept and replayed.
    ///
    /// # Example
    /// ```
    /// use std::time::Duration;
    /// let layer = tower_idempotency::IdempotencyLayer::memory().with_retention(Duration::from_secs(3600)).unwrap();
    /// # drop(layer);
    /// ```
    pub fn with_retention(self, retention: Duration) -> Result<Self, ConfigError> {
        let retention = check_duration("retention", retention)?;
        Ok(self.update(|c| c.retention = retention))
    }

    /// The largest request body buffered for fingerprinting; larger ones get
    /// 413 and nothing runs.
    ///
    /// # Example
    /// ```
    /// let layer = tower_idempotency::IdempotencyLayer::memory().with_body_limit(64 * 1024);
    /// # drop(layer);
    /// ```
    pub fn with_body_limit(self, bytes: usize) -> Self {
        self.update(|c| c.body_limit = bytes)
    }

    /// How long the whole request body may take to arrive. A slower one
    /// (a slow-loris client) gets 408 `body-timeout` and nothing runs.
    ///
    /// # Example
    /// ```
    /// use std::time::Duration;
    /// let layer = tower_idempotency::IdempotencyLayer::memory().with_body_timeout(Duration::from_secs(5)).unwrap();
    /// # drop(layer);
    /// ```
    pub fn with_body_timeout(self, timeout: Duration) -> Result<Self, ConfigError> {
        let timeout = check_duration("body timeout", timeout)?;
        Ok(self.update(|c| c.body_timeout = timeout))
    }

    /// The largest response body stored. A larger response is still
    /// delivered in full and never runs twice; its duplicates get 410
    /// `response-not-stored`.
    ///
    /// # Example
    /// ```
    /// let layer = tower_idempotency::IdempotencyLayer::memory().with_response_limit(4 << 20);
    /// # drop(layer);
    /// ```
    pub fn with_response_limit(self, bytes: usize) -> Self {
        self.update(|c| c.response_limit = bytes)
    }

    /// How long any one store call may take before it counts as failed.
    ///
    /// # Example
    /// ```
    /// use std::time::Duration;
    /// let layer = tower_idempotency::IdempotencyLayer::memory().with_store_timeout(Duration::from_millis(250)).unwrap();
    /// # drop(layer);
    /// ```
    pub fn with_store_timeout(self, timeout: Duration) -> Result<Self, ConfigError> {
        let timeout = check_duration("store timeout", timeout)?;
        Ok(self.update(|c| c.store_timeout = timeout))
    }

    /// The `Retry-After` sent with 409, 202 and 503 (rounded up to seconds).
    ///
    /// # Example
    /// ```
    /// use std::time::Duration;
    /// let layer = tower_idempotency::IdempotencyLayer::memory().with_retry_after(Duration::from_secs(2)).unwrap();
    /// # drop(layer);
    /// ```
    pub fn with_retry_after(self, retry_after: Duration) -> Result<Self, ConfigError> {
        let retry_after = check_duration("retry after", retry_after)?;
        Ok(self.update(|c| c.retry_after = retry_after))
    }

    /// What happens when the store fails.
    ///
    /// # Example
    /// ```
    /// use tower_idempotency::{FailureMode, IdempotencyLayer};
    /// let layer = IdempotencyLayer::memory().with_failure_mode(FailureMode::FailOpen);
    /// # drop(layer);
    /// ```
    pub fn with_failure_mode(self, mode: FailureMode) -> Self {
        self.update(|c| c.failure = mode)
    }

    /// Replaces the responses sent for rejections.
    ///
    /// # Example
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, Rejection};
    /// let layer = IdempotencyLayer::memory().with_responder(|r: &Rejection| r.default_response());
    /// # drop(layer);
    /// ```
    pub fn with_responder(self, responder: impl Responder) -> Self {
        self.update(|c| c.responder = Arc::new(responder))
    }

    /// Separates this layer's keys from other layers sharing the store.
    ///
    /// # Example
    /// ```
    /// let layer = tower_idempotency::IdempotencyLayer::memory().with_namespace("payments");
    /// # drop(layer);
    /// ```
    pub fn with_namespace(self, namespace: &str) -> Self {
        let namespace = Arc::from(namespace);
        self.update(|c| c.namespace = namespace)
    }
}

impl<St: Store> IdempotencyLayer<St> {
    /// The counters of every service this layer made.
    ///
    /// # Example
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, Outcome};
    /// let layer = IdempotencyLayer::memory();
    /// assert_eq!(layer.metrics().get(Outcome::Replayed), 0);
    /// ```
    pub fn metrics(&self) -> Metrics {
        self.config.metrics.clone()
    }

    /// The store.
    ///
    /// # Example
    /// ```
    /// let layer = tower_idempotency::IdempotencyLayer::memory();
    /// assert!(layer.store().is_empty());
    /// ```
    pub fn store(&self) -> &St {
        &self.config.store
    }

    /// Whether the store answers: one round trip under the store timeout
    /// (a lookup of a key nobody uses). Call it at startup, so that a wrong
    /// URL or a store that is down stops the service there, not on every
    /// request; on Redis it also connects, and warns about a
    /// `maxmemory-policy` that may evict records.
    ///
    /// # Example
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let layer = tower_idempotency::IdempotencyLayer::memory();
    /// layer.check().await.expect("the memory store always answers");
    /// # });
    /// ```
    pub async fn check(&self) -> Result<(), StoreError> {
        let config = &self.config;
        with_timeout(config.store_timeout, config.store.lookup(&RecordId::from_bytes([0; 32]))).await.map(drop)
    }

    /// The state of `key` within `scope`: for a status endpoint or an
    /// operator. `None` when the key is unknown or expired.
    ///
    /// # Example
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, Scope};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let layer = IdempotencyLayer::memory();
    /// let state = layer.lookup(&Scope::anonymous(), &"k".parse().unwrap()).await.unwrap();
    /// assert!(state.is_none());
    /// # });
    /// ```
    pub async fn lookup(&self, scope: &Scope, key: &IdempotencyKey) -> Result<Option<RecordState>, StoreError> {
        let id = RecordId::new(&self.config.namespace, scope, key);
        let config = &self.config;
        with_timeout(config.store_timeout, config.store.lookup(&id)).await
    }
}

/// `duration`, if it is above zero and at most [`MAX_DURATION`].
fn check_duration(what: &'static str, duration: Duration) -> Result<Duration, ConfigError> {
    match duration {
        Duration::ZERO => Err(ConfigError::Zero(what)),
        duration if duration > MAX_DURATION => Err(ConfigError::TooLong(what)),
        duration => Ok(duration),
    }
}

impl<S, St> Layer<S> for IdempotencyLayer<St> {
    type Service = Idempotency<S, St>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency::new(inner, self.config.clone())
    }
}
