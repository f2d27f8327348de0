//! The PostgreSQL stores, on a [`sqlx::PgPool`]: [`PostgresStore`], whose
//! records are rows of their own, and [`TransactionalStore`] (what
//! [`IdempotencyLayer::postgres`](crate::IdempotencyLayer::postgres)
//! builds), whose records commit in the request's own transaction with the
//! handler's writes.
//!
//! Both keep records in one table (default `idempotency_records`,
//! `with_table`), created by `migrate()` or by your own migrations from
//! `schema()`; a table serves one store or the other. The schema
//! (`{table}` is the table's name):
//!
#![doc = concat!("```sql\n", include_str!("queries/schema.sql"), "```")]
//!
//! Times come from the database's clock (`now()`), never the
//! application's; fencing tokens from the table's sequence. An expired
//! record acts as absent at once, and a task the store starts with its
//! first claim deletes expired records in batches of 1,000 every minute.
//!
//! # `PostgresStore`
//!
//! Each call is one statement (the queries are the `.sql` files beside
//! this one): a claim inserts the record or takes over an expired one and
//! answers what holds it otherwise, in one round trip; complete, release
//! and renew act only on a live claim of their owner. `Wait` duplicates
//! mark the record as waited for and listen (`LISTEN`, one connection per
//! store): its completion or release sends a `NOTIFY` only then, so neither
//! waiting nor completing polls (each wait lasts a second at most, so a
//! notification lost while the listening connection reconnects costs no
//! more). Behind a transaction pooler, give the listening connection a
//! direct URL or poll ([`PostgresStore::with_listen_url`]).
//!
//! # `TransactionalStore`
//!
//! It closes the window every other store leaves open: the handler commits
//! its business write, the process dies before the record is written, and
//! the retry runs the handler again. Here everything a request does is one
//! transaction, with transaction-scoped locks only, so any transaction
//! pooler is safe (PgBouncer `pool_mode = transaction`, RDS Proxy,
//! Supavisor):
//!
//! 1. The claim opens the request's transaction (`BEGIN`) and calls the
//!    table's claim function (`{table}_claim`, in the schema), which takes
//!    two advisory locks without waiting (`pg_try_advisory_xact_lock`):
//!    first one keyed by the record and the request's fingerprint, then the
//!    record's own. Whoever holds the record's lock so holds its
//!    fingerprint's too: a duplicate that finds the record's lock held but
//!    its own fingerprint's free knows the holder sent another payload
//!    (`422`) without reading anything; one that finds its fingerprint's
//!    lock held has the same payload (`409`, or it waits). (Two duplicates
//!    with the same other payload that race each other within a round trip
//!    may get `409` before `422`: the first holds that payload's lock until
//!    its rollback. A retry gets the `422`.)
//! 2. Holding the record's lock, the function reads the completed record in
//!    a statement of its own, which starts after the lock is held (a
//!    statement that won the lock as it ran could miss a record committed
//!    just before; a volatile function's statements take their own
//!    snapshots), and takes a fencing token from the sequence. A completed
//!    record is replayed and the transaction rolls back.
//! 3. The handler writes in the transaction ([`RequestTransaction`], an
//!    axum extractor and a request extension).
//! 4. When the inner service answers, the record is written in the same
//!    transaction, which commits; only then does the client get the
//!    response. The `COMMIT` does not run under the store timeout (a slow
//!    commit still lands); a commit lost from sight (the connection dropped
//!    after it was sent, or 30 s passed) is found out before the answer:
//!    the store waits for the record's lock on another connection and looks
//!    for the record with this claim's fencing token. If that cannot be
//!    found out either, the client gets `503`
//!    [`CommitUnknown`](crate::RejectionKind::CommitUnknown), which says a
//!    retry with the same key is safe, never that nothing was kept.
//!
//! So:
//!
//! - a response that is not stored (5xx, 408, 425, 429, or what the storage
//!   rule refuses), an inner service's error or a panic rolls the
//!   transaction back and frees the key. A stored `4xx` commits the
//!   handler's writes with it (as Stripe keeps a 4xx result); have the
//!   storage rule refuse it to roll it back;
//! - the response body is kept up to the storage cap before the commit; a
//!   body over the cap commits with a record that says so (`410` to
//!   duplicates), and a body that fails commits as failed: the writes stand
//!   and the key never runs again;
//! - a commit that the database refuses (a serialization failure, a
//!   deadlock, a deferred constraint) keeps nothing and answers
//!   [`NotCommitted`](crate::RejectionKind::NotCommitted), `503` with
//!   `Retry-After`: the retry runs again;
//! - a process that dies, a terminated backend, a dropped connection: the
//!   transaction and its locks go with it, and the retry runs at once,
//!   whatever the lease. A process that dies after its commit left a record
//!   that the retry replays.
//!
//! No row exists while a request runs: each request writes its record once,
//! with no in-flight insert and update (half the WAL, no dead tuple). So
//! [`Store::lookup`](super::Store::lookup) of a key in flight in another
//! process reports it in flight (from `pg_locks`) without fingerprint or
//! fencing token. The claim
//! lives as long as its transaction: renewals send nothing, and a live
//! owner never loses its key to its lease.
//!
//! `Wait` duplicates wait on the lock itself (a shared lock on their
//! fingerprint's key, with `lock_timeout` as the wait), then claim again:
//! no polling and no `LISTEN`. Each waiter holds a pool connection while it
//! waits, so at most half the pool's connections wait at once
//! ([`TransactionalStore::with_max_waiting`]); past that a duplicate gets
//! `409`. Each request in flight holds one connection for as long as its
//! handler runs: size the pool for both. A request that cannot get a
//! connection within the store timeout gets `503`, and its claim is
//! dropped, not finished later.
//!
//! Under `REPEATABLE READ` or `SERIALIZABLE` (a database's
//! `default_transaction_isolation`), a transaction's snapshot is taken by
//! its first statement, before the claim holds its lock, so the claim also
//! writes the record's row (uncommitted, its own) to find a record
//! committed in between: that write fails with a serialization failure,
//! and the claim starts over in a new transaction. One more round trip,
//! under those isolations only.
//!
//! A first execution costs these round trips besides the handler's own:
//! `BEGIN`, the claim function, the record and the `COMMIT` (the last two
//! cannot go in one: sqlx's transactions send their own `COMMIT`, and a
//! simple query would carry the body as a literal). A replay costs two, its
//! rollback riding on the connection's return to the pool. The claim
//! function is part of the schema: `migrate()` creates it, and your own
//! migrations must carry it (`schema()`); without it every claim fails
//! (`503`).
//!
//! Bound a stuck handler with PostgreSQL's `statement_timeout`, and if you
//! use `idle_in_transaction_session_timeout`, know the trade: when the
//! server ends a session whose handler waits on an external call (a payment
//! provider), the transaction and its lock go, a retry takes the key over at
//! once, and the external call runs twice; the first request's commit
//! fails. Pass the fencing token or a key derived from the idempotency key
//! ([`IdempotencyContext`](crate::IdempotencyContext)) to the external
//! system: that is the defence. Advisory locks share one key space per
//! database: an application's own advisory locks are unlikely to meet these
//! keys, but may.
//!
//! # Behind PgBouncer
//!
//! Both stores work behind PgBouncer in `pool_mode = transaction` (tested
//! with 1.18). Before 1.21, PgBouncer keeps no prepared statement across
//! transactions: connect with sqlx's statement cache off
//! (`postgres://…?statement-cache-capacity=0`), and let sqlx's startup
//! parameter through (`ignore_startup_parameters = extra_float_digits`). The stores then prepare
//! their statements unnamed, and run each statement outside a request's
//! transaction in a transaction of its own (sqlx prepares and runs a
//! statement in two exchanges, between which the pooler may switch server
//! connections). Your own queries need the same care there: `.persistent(false)`,
//! and inside a transaction. From 1.21 on, `max_prepared_statements` lets
//! the statement cache stay on. `PostgresStore`'s `LISTEN` needs a session
//! of its own: give it a direct URL, or let it poll
//! ([`PostgresStore::with_listen_url`]).

use std::{
    sync::{Arc, Weak},
    time::Duration,
};

use sqlx::{PgPool, postgres::PgRow};

mod plain;
mod queries;
mod transaction;
mod transactional;
mod waiters;

use self::queries::{PgQuery, Queries};
pub use self::{
    plain::PostgresStore,
    transaction::{RequestTransaction, TransactionEnded, TransactionGuard},
    transactional::TransactionalStore,
};
use super::{OwnerTokens, StoreError};
use crate::{ConfigError, Fingerprint, RecordId};

pub use sqlx;

/// Expired records deleted per statement by the background purge.
const PURGE_BATCH: i64 = 1_000;
/// How often the background purge runs.
const PURGE_EVERY: Duration = Duration::from_secs(60);
/// The table both stores use unless told otherwise.
const DEFAULT_TABLE: &str = "idempotency_records";

/// What both PostgreSQL stores keep: the pool, the table and its queries,
/// the owner tokens, and the background purge.
struct Shared {
    pool: PgPool,
    table: String,
    queries: Queries,
    /// Mixed into every advisory lock key, so that two tables' records
    /// never share one.
    lock_salt: [u8; 16],
    owners: OwnerTokens,
    purging: std::sync::Once,
}

impl Shared {
    /// The pool's size when all its connections are in use and it can open
    /// no more.
    fn pool_exhausted(&self) -> Option<u32> {
        let max = self.pool.options().get_max_connections();
        (self.pool.size() >= max && self.pool.num_idle() == 0).then_some(max)
    }

    fn new(pool: PgPool, table: &str) -> Arc<Self> {
        let salt = <sha2::Sha256 as sha2::Digest>::digest(table.as_bytes());
        Arc::new(Self {
            queries: Queries::for_table(table, !statement_cache_off(&pool)),
            lock_salt: std::array::from_fn(|i| salt[i]),
            pool,
            table: table.to_owned(),
            owners: OwnerTokens::new(),
            purging: std::sync::Once::new(),
        })
    }

    /// `table`, checked: a plain SQL identifier.
    fn checked(table: &str) -> Result<&str, ConfigError> {
        let plain = table.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if table.is_empty() || table.len() > 50 || !plain || table.as_bytes()[0].is_ascii_digit() {
            return Err(ConfigError::InvalidName("table"));
        }
        Ok(table)
    }

    /// The advisory lock key of a record: a request's transaction holds it
    /// while the record is the request's.
    fn record_lock(&self, id: &RecordId) -> i64 {
        let bytes = id.as_bytes();
        i64::from_be_bytes(std::array::from_fn(|i| bytes[i] ^ self.lock_salt[i]))
    }

    /// The advisory lock key of a record and a fingerprint: the record's
    /// holder holds it for its own fingerprint.
    fn fingerprint_lock(&self, id: &RecordId, fingerprint: &Fingerprint) -> i64 {
        let (id, fingerprint) = (id.as_bytes(), fingerprint.as_bytes());
        i64::from_be_bytes(std::array::from_fn(|i| id[8 + i] ^ fingerprint[i] ^ self.lock_salt[8 + i]))
    }

    /// Runs a statement outside the request's transactions. With the
    /// statement cache off (behind a transaction pooler), in a transaction
    /// of its own: sqlx prepares and runs a statement in two exchanges, and
    /// between them, outside a transaction, the pooler may hand the session
    /// to another client.
    async fn fetch_optional(&self, query: PgQuery<'_>) -> Result<Option<PgRow>, StoreError> {
        if self.queries.persistent {
            return query.fetch_optional(&self.pool).await.map_err(StoreError::unavailable);
        }
        let mut transaction = self.pool.begin().await.map_err(StoreError::unavailable)?;
        let row = query.fetch_optional(&mut *transaction).await.map_err(StoreError::unavailable)?;
        transaction.commit().await.map_err(StoreError::unavailable)?;
        Ok(row)
    }

    /// As [`Shared::fetch_optional`], for a statement that answers one row.
    async fn fetch_one(&self, query: PgQuery<'_>) -> Result<PgRow, StoreError> {
        self.fetch_optional(query).await?.ok_or_else(|| StoreError::unavailable("a statement answered no row"))
    }

    /// As [`Shared::fetch_optional`], for a statement that answers how many
    /// rows it changed.
    async fn execute(&self, query: PgQuery<'_>) -> Result<u64, StoreError> {
        if self.queries.persistent {
            let done = query.execute(&self.pool).await.map_err(StoreError::unavailable)?;
            return Ok(done.rows_affected());
        }
        let mut transaction = self.pool.begin().await.map_err(StoreError::unavailable)?;
        let done = query.execute(&mut *transaction).await.map_err(StoreError::unavailable)?;
        transaction.commit().await.map_err(StoreError::unavailable)?;
        Ok(done.rows_affected())
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::raw_sql(sqlx::AssertSqlSafe(self.queries.schema.clone()))
            .execute(&self.pool)
            .await
            .map_err(StoreError::unavailable)?;
        Ok(())
    }

    async fn purge(&self, limit: i64) -> Result<u64, StoreError> {
        self.execute(self.queries.purge(limit)).await
    }

    /// Starts the background purge, once, on the runtime of the first claim.
    fn start_purging(self: &Arc<Self>) {
        self.purging.call_once(|| {
            let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
            runtime.spawn(purge_forever(Arc::downgrade(self)));
        });
    }
}

/// Whether `pool` connects with sqlx's statement cache off
/// (`?statement-cache-capacity=0`, as behind PgBouncer before 1.21).
fn statement_cache_off(pool: &PgPool) -> bool {
    use sqlx::ConnectOptions as _;
    let url = pool.connect_options().to_url_lossy();
    url.query_pairs().any(|(name, value)| name == "statement-cache-capacity" && value == "0")
}

/// Deletes expired records in batches every [`PURGE_EVERY`], for as long as
/// the store lives.
async fn purge_forever(shared: Weak<Shared>) {
    loop {
        tokio::time::sleep(PURGE_EVERY).await;
        let Some(shared) = shared.upgrade() else { return };
        loop {
            match shared.purge(PURGE_BATCH).await {
                Ok(deleted) if deleted == PURGE_BATCH as u64 => continue,
                Ok(_) => break,
                Err(error) => {
                    tracing::warn!(%error, "purging expired idempotency records failed");
                    break;
                }
            }
        }
    }
}

fn corrupt(what: &'static str) -> StoreError {
    StoreError::Corrupt(crate::DecodeError::Malformed(what))
}
