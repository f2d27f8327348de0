//! The request's transaction, under a transactional [`PostgresStore`]: the
//! inner service writes in it, and the store commits the record in it.
//!
//! [`PostgresStore`]: super::PostgresStore

use std::{
    collections::HashMap,
    fmt,
    ops::{Deref, DerefMut},
    sync::{Arc, Mutex, PoisonError},
};

use sqlx::{PgConnection, Postgres};
use tokio::sync::{Mutex as AsyncMutex, OwnedMappedMutexGuard, OwnedMutexGuard};

use crate::store::OwnerToken;

type Transaction = sqlx::Transaction<'static, Postgres>;

/// The database transaction of a request that runs under a transactional
/// [`PostgresStore`](super::PostgresStore): write the request's business
/// changes in it, and they commit together with its idempotency record,
/// once the response is known, or not at all.
///
/// The layer puts it in the request's extensions; axum handlers take it as
/// an extractor (feature `axum`). It exists only for requests the layer
/// guards (those with an idempotency key); a handler that also serves
/// requests without one takes `Option<RequestTransaction>`.
///
/// Do not keep it past the response: the layer takes the transaction back
/// to commit it, and waits (up to the store timeout) for a handler that
/// still holds it locked.
///
/// # Example
/// ```no_run
/// use axum::{Router, routing::post};
/// use tower_idempotency::{IdempotencyLayer, store::postgres::{RequestTransaction, sqlx}};
///
/// async fn charge(transaction: RequestTransaction) -> Result<&'static str, http::StatusCode> {
///     let mut connection = transaction.lock().await.map_err(|_| http::StatusCode::INTERNAL_SERVER_ERROR)?;
///     sqlx::query("INSERT INTO charges (amount) VALUES (100)")
///         .execute(&mut *connection)
///         .await
///         .map_err(|_| http::StatusCode::SERVICE_UNAVAILABLE)?;
///     Ok("charged")
/// }
///
/// # async fn run() {
/// let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1/app").await.unwrap();
/// let app: Router = Router::new().route("/charges", post(charge)).layer(IdempotencyLayer::postgres(pool));
/// # drop(app);
/// # }
/// ```
///
/// Any tower service finds it in the request's extensions:
///
/// ```
/// use tower_idempotency::{RequestBody, store::postgres::RequestTransaction};
///
/// fn transaction_of<B>(request: &http::Request<RequestBody<B>>) -> Option<&RequestTransaction> {
///     request.extensions().get::<RequestTransaction>()
/// }
/// ```
#[derive(Clone)]
pub struct RequestTransaction {
    open: Arc<AsyncMutex<Option<Transaction>>>,
}

impl fmt::Debug for RequestTransaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestTransaction").finish_non_exhaustive()
    }
}

impl RequestTransaction {
    fn new(transaction: Transaction) -> Self {
        Self { open: Arc::new(AsyncMutex::new(Some(transaction))) }
    }

    /// The transaction's connection, for as long as the guard lives: pass
    /// `&mut *guard` to sqlx as the executor. Fails once the transaction
    /// is over (the response was answered).
    ///
    /// # Example
    /// ```
    /// use tower_idempotency::store::postgres::{RequestTransaction, TransactionEnded, sqlx};
    ///
    /// async fn record_charge(transaction: &RequestTransaction) -> Result<(), Box<dyn std::error::Error>> {
    ///     let mut connection = transaction.lock().await?;
    ///     sqlx::query("INSERT INTO charges (amount) VALUES ($1)").bind(100_i64).execute(&mut *connection).await?;
    ///     Ok(())
    /// }
    /// ```
    pub async fn lock(&self) -> Result<TransactionGuard, TransactionEnded> {
        let guard = self.open.clone().lock_owned().await;
        OwnedMutexGuard::try_map(guard, Option::as_mut).map(TransactionGuard).map_err(|_| TransactionEnded)
    }

    /// Takes the transaction out, to commit or roll it back: waits for a
    /// handler that still holds it.
    async fn take(&self) -> Option<Transaction> {
        self.open.lock().await.take()
    }

    /// Takes the transaction out if no handler holds it; one that does
    /// rolls it back when it lets go of the last handle.
    fn try_take(&self) -> Option<Transaction> {
        self.open.try_lock().ok()?.take()
    }
}

/// A request's transaction, locked for the caller: it dereferences to the
/// transaction's [`PgConnection`]. Made by [`RequestTransaction::lock`].
///
/// # Example
/// ```
/// use tower_idempotency::store::postgres::{RequestTransaction, sqlx};
///
/// async fn count(transaction: &RequestTransaction) -> Option<i64> {
///     let mut connection = transaction.lock().await.ok()?;
///     sqlx::query_scalar("SELECT count(*) FROM charges").fetch_one(&mut *connection).await.ok()
/// }
/// ```
pub struct TransactionGuard(OwnedMappedMutexGuard<Option<Transaction>, Transaction>);

impl fmt::Debug for TransactionGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransactionGuard").finish_non_exhaustive()
    }
}

impl Deref for TransactionGuard {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.0
    }
}

impl DerefMut for TransactionGuard {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.0
    }
}

/// The request's transaction is over: it was committed or rolled back when
/// the response was answered.
///
/// # Example
/// ```
/// use tower_idempotency::store::postgres::TransactionEnded;
///
/// assert!(TransactionEnded.to_string().contains("over"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the request's transaction is over: it ended with the response")]
pub struct TransactionEnded;

/// The open transactions of a store's executing claims, by owner.
#[derive(Default)]
pub(super) struct OpenTransactions {
    by_owner: Mutex<HashMap<OwnerToken, RequestTransaction>>,
}

impl OpenTransactions {
    pub(super) fn open(&self, owner: OwnerToken, transaction: Transaction) {
        self.lock().insert(owner, RequestTransaction::new(transaction));
    }

    pub(super) fn get(&self, owner: OwnerToken) -> Option<RequestTransaction> {
        self.lock().get(&owner).cloned()
    }

    /// The transaction of `owner`, no longer open to others; waits for a
    /// handler that holds it. `None` when there is none (or it was taken).
    pub(super) async fn take(&self, owner: OwnerToken) -> Option<Option<Transaction>> {
        let open = self.lock().remove(&owner)?;
        Some(open.take().await)
    }

    /// As [`OpenTransactions::take`], without waiting.
    pub(super) fn try_take(&self, owner: OwnerToken) -> Option<Transaction> {
        self.lock().remove(&owner)?.try_take()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<OwnerToken, RequestTransaction>> {
        // A panic never leaves the map half-changed.
        self.by_owner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(feature = "axum")]
mod extract {
    use axum_core::{
        extract::{FromRequestParts, OptionalFromRequestParts},
        response::Response,
    };
    use http::request::Parts;

    use super::RequestTransaction;
    use crate::context::extract::missing_key;

    const EXTRACTOR_DETAIL: &str = "Send an Idempotency-Key header with this request: its handler writes in the \
                                    request's transaction, which only requests with a key have.";

    impl<S: Send + Sync> FromRequestParts<S> for RequestTransaction {
        type Rejection = Response;

        async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
            parts
                .extensions
                .get::<Self>()
                .cloned()
                .ok_or_else(|| missing_key(parts, "RequestTransaction", EXTRACTOR_DETAIL))
        }
    }

    impl<S: Send + Sync> OptionalFromRequestParts<S> for RequestTransaction {
        type Rejection = std::convert::Infallible;

        async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Option<Self>, Self::Rejection> {
            Ok(parts.extensions.get::<Self>().cloned())
        }
    }
}
