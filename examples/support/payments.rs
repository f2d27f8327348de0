//! The payment API of `examples/payment_api.rs`: a small copy of Stripe's v1
//! charges API with a SQLite ledger, or one in PostgreSQL (feature
//! `postgres`) where each charge is inserted in its request's transaction,
//! shared with `examples/retry_storm.rs` and the tests.
#![allow(dead_code)]

use std::{
    collections::{BTreeMap, HashMap},
    hash::{BuildHasher, RandomState},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Extension, Json, Router,
    body::Bytes,
    extract::{Path as UrlPath, Request, State},
    http::{HeaderMap, StatusCode, header, request::Parts},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tower_idempotency::{
    IdempotencyContext, IdempotencyKey, IdempotencyLayer, Scope, Store, StoreResponse, store::RecordState,
};

/// A charge as Stripe's v1 API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Charge {
    pub id: String,
    pub object: String,
    pub amount: i64,
    pub currency: String,
    pub status: String,
    pub paid: bool,
    pub created: i64,
    pub description: Option<String>,
    pub metadata: BTreeMap<String, String>,
}

/// What `POST /v1/charges` asks for.
#[derive(Debug)]
struct NewCharge {
    amount: i64,
    currency: String,
    source: String,
    description: Option<String>,
    metadata: BTreeMap<String, String>,
}

/// The caller: the API key from `Authorization: Bearer sk_...` (or basic
/// auth with the key as the user name, as `curl -u sk_test_1:` sends it).
#[derive(Debug, Clone)]
pub struct ApiKey(pub String);

/// Where charges are kept.
enum Ledger {
    Sqlite(Mutex<rusqlite::Connection>),
    /// Charges inserted in the request's transaction, which commits with its
    /// idempotency record.
    #[cfg(feature = "postgres")]
    Postgres(tower_idempotency::store::postgres::sqlx::PgPool),
}

/// What a ledger call failed with, for the API's 500.
type LedgerError = String;

/// A charge a response was made of, marked so that a middleware outside the
/// idempotency layer aborts the process once the layer let the response go
/// (after the commit, in transactional mode): `abort_after_commit`.
#[derive(Debug, Clone, Copy)]
pub struct AbortAfterCommit;

/// The ledger and the simulated card processor.
pub struct Payments {
    ledger: Ledger,
    processor_latency: Duration,
    executions: AtomicU64,
    ids: RandomState,
    next_id: AtomicU64,
}

impl Payments {
    /// Opens (or creates) the ledger at `path`.
    pub fn open(path: &Path, processor_latency: Duration) -> rusqlite::Result<Arc<Self>> {
        let ledger = rusqlite::Connection::open(path)?;
        ledger.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS charges (
                 id TEXT PRIMARY KEY,
                 api_key TEXT NOT NULL,
                 idempotency_key TEXT NOT NULL,
                 amount INTEGER NOT NULL,
                 currency TEXT NOT NULL,
                 status TEXT NOT NULL,
                 paid INTEGER NOT NULL,
                 created INTEGER NOT NULL,
                 description TEXT,
                 metadata TEXT NOT NULL,
                 source TEXT NOT NULL DEFAULT '',
                 UNIQUE (api_key, idempotency_key)
             );",
        )?;
        // A ledger from before `source` was kept.
        let columns: Vec<String> = ledger
            .prepare("SELECT name FROM pragma_table_info('charges')")?
            .query_map([], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        if !columns.iter().any(|column| column == "source") {
            ledger.execute_batch("ALTER TABLE charges ADD COLUMN source TEXT NOT NULL DEFAULT ''")?;
        }
        Ok(Self::with_ledger(Ledger::Sqlite(Mutex::new(ledger)), processor_latency))
    }

    /// A ledger in PostgreSQL, on the pool the idempotency records use.
    #[cfg(feature = "postgres")]
    pub async fn on_postgres(
        pool: tower_idempotency::store::postgres::sqlx::PgPool,
        processor_latency: Duration,
    ) -> Result<Arc<Self>, tower_idempotency::store::postgres::sqlx::Error> {
        tower_idempotency::store::postgres::sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS charges (
                 id TEXT PRIMARY KEY,
                 api_key TEXT NOT NULL,
                 idempotency_key TEXT NOT NULL,
                 amount BIGINT NOT NULL,
                 currency TEXT NOT NULL,
                 status TEXT NOT NULL,
                 paid BOOLEAN NOT NULL,
                 created BIGINT NOT NULL,
                 description TEXT,
                 metadata TEXT NOT NULL,
                 source TEXT NOT NULL,
                 seq BIGSERIAL,
                 UNIQUE (api_key, idempotency_key)
             );
             CREATE TABLE IF NOT EXISTS simulated_faults (
                 api_key TEXT NOT NULL,
                 idempotency_key TEXT NOT NULL,
                 PRIMARY KEY (api_key, idempotency_key)
             )",
        )
        .execute(&pool)
        .await?;
        Ok(Self::with_ledger(Ledger::Postgres(pool), processor_latency))
    }

    fn with_ledger(ledger: Ledger, processor_latency: Duration) -> Arc<Self> {
        Arc::new(Self {
            ledger,
            processor_latency,
            executions: AtomicU64::new(0),
            ids: RandomState::new(),
            next_id: AtomicU64::new(0),
        })
    }

    /// How many times the charge handler ran.
    pub fn executions(&self) -> u64 {
        self.executions.load(Ordering::SeqCst)
    }

    fn charge_id(&self) -> String {
        const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut id = String::from("ch_");
        for half in [self.ids.hash_one((n, 0u8)), self.ids.hash_one((n, 1u8))] {
            let mut v = half;
            for _ in 0..12 {
                id.push(char::from(ALPHABET[(v % 62) as usize]));
                v /= 62;
            }
        }
        id
    }

    /// The charge recorded for this caller's idempotency key, if any, and
    /// the source it charged; read in the request's transaction when the
    /// ledger is in PostgreSQL.
    #[cfg_attr(not(feature = "postgres"), allow(unused_variables, reason = "a SQLite ledger has no transaction"))]
    async fn find_by_key(
        self: &Arc<Self>,
        transaction: Option<&Transaction>,
        api_key: &str,
        idempotency_key: &str,
    ) -> Result<Option<(Charge, String)>, LedgerError> {
        match &self.ledger {
            Ledger::Sqlite(_) => {
                let (payments, api_key, key) = (self.clone(), api_key.to_owned(), idempotency_key.to_owned());
                let found = tokio::task::spawn_blocking(move || sqlite_find(&payments.sqlite(), &api_key, &key));
                found.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())
            }
            #[cfg(feature = "postgres")]
            Ledger::Postgres(pool) => postgres::find(pool, transaction, api_key, idempotency_key).await,
        }
    }

    /// Records `charge` of `source` (in the request's transaction when the
    /// ledger is in PostgreSQL); when the ledger already holds one for this
    /// key (a second execution that slipped past the layer), returns that
    /// one and its source.
    #[cfg_attr(not(feature = "postgres"), allow(unused_variables, reason = "a SQLite ledger has no transaction"))]
    async fn insert(
        self: &Arc<Self>,
        transaction: Option<&Transaction>,
        api_key: &str,
        idempotency_key: &str,
        charge: &Charge,
        source: &str,
    ) -> Result<((Charge, String), bool), LedgerError> {
        match &self.ledger {
            Ledger::Sqlite(_) => {
                let payments = self.clone();
                let (api_key, key, charge, source) =
                    (api_key.to_owned(), idempotency_key.to_owned(), charge.clone(), source.to_owned());
                let inserted = tokio::task::spawn_blocking(move || {
                    sqlite_insert(&payments.sqlite(), &api_key, &key, &charge, &source)
                });
                inserted.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())
            }
            #[cfg(feature = "postgres")]
            Ledger::Postgres(pool) => {
                postgres::insert(pool, transaction, api_key, idempotency_key, charge, source).await
            }
        }
    }

    /// Whether a simulated fault fires for this key: each key's fires once.
    /// A SQLite ledger keeps the charge of a crashed request, so the retry
    /// never reaches the fault again; one in PostgreSQL rolled the charge
    /// back, so the fault is noted outside the request's transaction.
    async fn fault_fires(&self, api_key: &str, idempotency_key: &str) -> bool {
        match &self.ledger {
            Ledger::Sqlite(_) => true,
            #[cfg(feature = "postgres")]
            Ledger::Postgres(pool) => postgres::first_fault(pool, api_key, idempotency_key).await,
        }
    }

    /// Every charge of one caller, oldest first.
    pub async fn charges(self: &Arc<Self>, api_key: &str) -> Result<Vec<Charge>, LedgerError> {
        match &self.ledger {
            Ledger::Sqlite(_) => {
                let (payments, api_key) = (self.clone(), api_key.to_owned());
                let charges = tokio::task::spawn_blocking(move || sqlite_charges(&payments.sqlite(), &api_key));
                charges.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())
            }
            #[cfg(feature = "postgres")]
            Ledger::Postgres(pool) => postgres::charges(pool, api_key).await,
        }
    }

    fn sqlite(&self) -> std::sync::MutexGuard<'_, rusqlite::Connection> {
        match &self.ledger {
            Ledger::Sqlite(ledger) => ledger.lock().unwrap_or_else(|poison| poison.into_inner()),
            #[cfg(feature = "postgres")]
            Ledger::Postgres(_) => unreachable!("SQLite is asked only for a SQLite ledger"),
        }
    }
}

#[cfg(feature = "postgres")]
type Transaction = tower_idempotency::store::postgres::RequestTransaction;
/// Stands for the request's transaction where there is none to have.
#[cfg(not(feature = "postgres"))]
type Transaction = ();

fn sqlite_find(
    ledger: &rusqlite::Connection,
    api_key: &str,
    idempotency_key: &str,
) -> rusqlite::Result<Option<(Charge, String)>> {
    ledger
        .query_row(
            "SELECT id, amount, currency, status, paid, created, description, metadata, source
             FROM charges WHERE api_key = ?1 AND idempotency_key = ?2",
            params![api_key, idempotency_key],
            |row| Ok((charge_from_row(row)?, row.get(8)?)),
        )
        .optional()
}

fn sqlite_insert(
    ledger: &rusqlite::Connection,
    api_key: &str,
    idempotency_key: &str,
    charge: &Charge,
    source: &str,
) -> rusqlite::Result<((Charge, String), bool)> {
    let inserted = ledger.execute(
        "INSERT INTO charges (id, api_key, idempotency_key, amount, currency, status, paid, created, description, metadata, source)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
         ON CONFLICT (api_key, idempotency_key) DO NOTHING",
        params![
            charge.id,
            api_key,
            idempotency_key,
            charge.amount,
            charge.currency,
            charge.status,
            charge.paid,
            charge.created,
            charge.description,
            serde_json::to_string(&charge.metadata).unwrap_or_default(),
            source,
        ],
    )?;
    if inserted == 1 {
        return Ok(((charge.clone(), source.to_owned()), true));
    }
    let existing = sqlite_find(ledger, api_key, idempotency_key)?;
    Ok((existing.unwrap_or_else(|| (charge.clone(), source.to_owned())), false))
}

fn sqlite_charges(ledger: &rusqlite::Connection, api_key: &str) -> rusqlite::Result<Vec<Charge>> {
    let mut statement = ledger.prepare(
        "SELECT id, amount, currency, status, paid, created, description, metadata
         FROM charges WHERE api_key = ?1 ORDER BY created, rowid",
    )?;
    let rows = statement.query_map(params![api_key], charge_from_row)?;
    rows.collect()
}

/// The ledger in PostgreSQL: writes go to the request's transaction, reads
/// outside a request to the pool.
#[cfg(feature = "postgres")]
mod postgres {
    use std::collections::BTreeMap;

    use tower_idempotency::store::postgres::sqlx::{self, PgPool, Row, postgres::PgRow};

    use super::{Charge, LedgerError, Transaction};

    const COLUMNS: &str = "id, amount, currency, status, paid, created, description, metadata, source";

    // Every statement is unnamed, and one outside a request's transaction
    // runs in one of its own: safe behind a transaction pooler (PgBouncer
    // before 1.21, `?statement-cache-capacity=0`), as the README says.

    fn charge_of(row: &PgRow) -> Result<(Charge, String), sqlx::Error> {
        let metadata: String = row.try_get("metadata")?;
        let charge = Charge {
            id: row.try_get("id")?,
            object: "charge".to_owned(),
            amount: row.try_get("amount")?,
            currency: row.try_get("currency")?,
            status: row.try_get("status")?,
            paid: row.try_get("paid")?,
            created: row.try_get("created")?,
            description: row.try_get("description")?,
            metadata: serde_json::from_str::<BTreeMap<String, String>>(&metadata).unwrap_or_default(),
        };
        Ok((charge, row.try_get("source")?))
    }

    fn no_transaction() -> LedgerError {
        "the request has no transaction: is it under IdempotencyLayer::postgres, with a key?".to_owned()
    }

    pub(super) async fn find(
        pool: &PgPool,
        transaction: Option<&Transaction>,
        api_key: &str,
        key: &str,
    ) -> Result<Option<(Charge, String)>, LedgerError> {
        let sql = format!("SELECT {COLUMNS} FROM charges WHERE api_key = $1 AND idempotency_key = $2");
        let query = sqlx::query(sqlx::AssertSqlSafe(sql)).persistent(false).bind(api_key).bind(key);
        let row = match transaction {
            Some(transaction) => {
                let mut connection = transaction.lock().await.map_err(|e| e.to_string())?;
                query.fetch_optional(&mut *connection).await
            }
            None => {
                async {
                    let mut own = pool.begin().await?;
                    let row = query.fetch_optional(&mut *own).await?;
                    own.commit().await.map(|()| row)
                }
                .await
            }
        };
        row.map_err(|e| e.to_string())?.map(|row| charge_of(&row).map_err(|e| e.to_string())).transpose()
    }

    pub(super) async fn insert(
        pool: &PgPool,
        transaction: Option<&Transaction>,
        api_key: &str,
        key: &str,
        charge: &Charge,
        source: &str,
    ) -> Result<((Charge, String), bool), LedgerError> {
        let transaction = transaction.ok_or_else(no_transaction)?;
        let inserted = {
            let mut connection = transaction.lock().await.map_err(|e| e.to_string())?;
            sqlx::query(
                "INSERT INTO charges (id, api_key, idempotency_key, amount, currency, status, paid, created, description, metadata, source)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                 ON CONFLICT (api_key, idempotency_key) DO NOTHING",
            )
            .persistent(false)
            .bind(&charge.id)
            .bind(api_key)
            .bind(key)
            .bind(charge.amount)
            .bind(&charge.currency)
            .bind(&charge.status)
            .bind(charge.paid)
            .bind(charge.created)
            .bind(&charge.description)
            .bind(serde_json::to_string(&charge.metadata).unwrap_or_default())
            .bind(source)
            .execute(&mut *connection)
            .await
            .map_err(|e| e.to_string())?
            .rows_affected()
        };
        if inserted == 1 {
            return Ok(((charge.clone(), source.to_owned()), true));
        }
        let existing = find(pool, Some(transaction), api_key, key).await?;
        Ok((existing.unwrap_or_else(|| (charge.clone(), source.to_owned())), false))
    }

    /// Notes a simulated fault of this key; whether it is the first.
    pub(super) async fn first_fault(pool: &PgPool, api_key: &str, key: &str) -> bool {
        let noted = async {
            let mut own = pool.begin().await?;
            let done = sqlx::query(
                "INSERT INTO simulated_faults (api_key, idempotency_key) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )
            .persistent(false)
            .bind(api_key)
            .bind(key)
            .execute(&mut *own)
            .await?;
            own.commit().await.map(|()| done.rows_affected())
        };
        noted.await.is_ok_and(|rows| rows == 1)
    }

    pub(super) async fn charges(pool: &PgPool, api_key: &str) -> Result<Vec<Charge>, LedgerError> {
        let sql = format!("SELECT {COLUMNS} FROM charges WHERE api_key = $1 ORDER BY created, seq");
        let rows = async {
            let mut own = pool.begin().await?;
            let rows =
                sqlx::query(sqlx::AssertSqlSafe(sql)).persistent(false).bind(api_key).fetch_all(&mut *own).await?;
            own.commit().await.map(|()| rows)
        };
        let rows = rows.await.map_err(|e: sqlx::Error| e.to_string())?;
        rows.iter().map(|row| charge_of(row).map(|(charge, _)| charge).map_err(|e| e.to_string())).collect()
    }
}

fn charge_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Charge> {
    let metadata: String = row.get(7)?;
    Ok(Charge {
        id: row.get(0)?,
        object: "charge".to_owned(),
        amount: row.get(1)?,
        currency: row.get(2)?,
        status: row.get(3)?,
        paid: row.get(4)?,
        created: row.get(5)?,
        description: row.get(6)?,
        metadata: serde_json::from_str(&metadata).unwrap_or_default(),
    })
}

struct AppState<St> {
    layer: IdempotencyLayer<St>,
    payments: Arc<Payments>,
}

impl<St> Clone for AppState<St> {
    fn clone(&self) -> Self {
        Self { layer: self.layer.clone(), payments: self.payments.clone() }
    }
}

/// The idempotency settings of the payment API on top of `layer`'s: a key
/// is required on `POST /v1/charges`, and the API key is the scope.
pub fn configure<St: Store + Clone>(layer: IdempotencyLayer<St>) -> IdempotencyLayer<St> {
    layer
        .with_key_required_if(|parts: &Parts| parts.uri.path() == "/v1/charges")
        .with_scope(|parts: &Parts| parts.extensions.get::<ApiKey>().map(|key| Scope::hashed(key.0.as_bytes())))
}

/// The whole API: routes, the idempotency layer, and authentication in
/// front of both.
pub fn router<St: Store + Clone>(layer: IdempotencyLayer<St>, payments: Arc<Payments>) -> Router {
    let layer = configure(layer);
    let state = AppState { layer: layer.clone(), payments };
    Router::new()
        // On the route's own methods only (`MethodRouter::route_layer`): a
        // keyed request that no handler runs (404, 405) leaves no record.
        .route("/v1/charges", post(create_charge::<St>).get(list_charges::<St>).route_layer(layer))
        .route("/v1/charges/{id}", get(get_charge::<St>))
        .route("/v1/idempotency/{key}", get(key_state::<St>))
        .route("/internal/stats", get(stats::<St>))
        .layer(middleware::from_fn(abort_after_commit))
        .layer(middleware::from_fn(authenticate))
        .with_state(state)
}

async fn authenticate(mut request: Request, next: Next) -> Response {
    match api_key(request.headers()) {
        Some(key) => {
            request.extensions_mut().insert(ApiKey(key));
            next.run(request).await
        }
        None => stripe_error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            None,
            "You did not provide an API key. Send it as 'Authorization: Bearer sk_...'.",
        ),
    }
}

fn api_key(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    // Auth schemes are case-insensitive (RFC 9110, section 11.1).
    let (scheme, credentials) = value.split_once(' ')?;
    let key = if scheme.eq_ignore_ascii_case("bearer") {
        credentials.trim().to_owned()
    } else if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64_decode(credentials.trim())?;
        decoded.split(':').next()?.to_owned()
    } else {
        return None;
    };
    (!key.is_empty()).then_some(key)
}

fn base64_decode(input: &str) -> Option<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let (mut bits, mut count, mut out) = (0u32, 0, Vec::new());
    for c in input.bytes().filter(|&c| c != b'=') {
        bits = (bits << 6) | ALPHABET.iter().position(|&a| a == c)? as u32;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
        }
    }
    String::from_utf8(out).ok()
}

fn stripe_error(status: StatusCode, kind: &str, code: Option<&str>, message: &str) -> Response {
    let mut error = json!({ "type": kind, "message": message });
    if let Some(code) = code {
        error["code"] = json!(code);
    }
    (status, Json(json!({ "error": error }))).into_response()
}

fn ledger_error(error: impl std::fmt::Display) -> Response {
    stripe_error(StatusCode::INTERNAL_SERVER_ERROR, "api_error", None, &format!("ledger: {error}"))
}

async fn create_charge<St>(
    State(state): State<AppState<St>>,
    Extension(ApiKey(api_key)): Extension<ApiKey>,
    Extension(context): Extension<IdempotencyContext>,
    transaction: Option<Extension<Transaction>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let payments = state.payments.clone();
    let transaction = transaction.as_ref().map(|Extension(transaction)| transaction);
    payments.executions.fetch_add(1, Ordering::SeqCst);
    let is_json = headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let new = match if is_json { parse_json(&body) } else { parse_form(&body) } {
        Ok(new) => new,
        Err(message) => return stripe_error(StatusCode::BAD_REQUEST, "invalid_request_error", None, &message),
    };
    // The second line of defence: a key the ledger already knows gets the
    // charge it made, never a new one; asked with another payload, 422.
    let key = context.derived_key();
    match payments.find_by_key(transaction, &api_key, &key).await {
        Ok(Some(existing)) => return answer_for_known_key(existing, &new),
        Ok(None) => {}
        Err(error) => return ledger_error(error),
    }
    if new.source == "tok_chargeDeclined" {
        return stripe_error(
            StatusCode::PAYMENT_REQUIRED,
            "card_error",
            Some("card_declined"),
            "Your card was declined.",
        );
    }
    // "Call the processor."
    if !payments.processor_latency.is_zero() {
        tokio::time::sleep(payments.processor_latency).await;
    }
    let simulate = new.metadata.get("simulate").map(String::as_str);
    let charge = Charge {
        id: payments.charge_id(),
        object: "charge".to_owned(),
        amount: new.amount,
        currency: new.currency.clone(),
        status: "succeeded".to_owned(),
        paid: true,
        created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64),
        description: new.description.clone(),
        metadata: new.metadata.clone(),
    };
    let simulate = match simulate {
        Some(switch) if payments.fault_fires(&api_key, &key).await => Some(switch),
        _ => None,
    };
    match payments.insert(transaction, &api_key, &key, &charge, &new.source).await {
        Ok(((charge, _), true)) => match simulate {
            Some("crash_after_charge") => panic!("simulated crash after charging {}", charge.id),
            Some("abort_before_commit") => {
                eprintln!("payment_api: simulated abort after charging {}, before the commit", charge.id);
                std::process::abort();
            }
            Some("abort_after_commit") => {
                let mut response = (StatusCode::OK, Json(charge)).into_response();
                response.extensions_mut().insert(AbortAfterCommit);
                response
            }
            _ => (StatusCode::OK, Json(charge)).into_response(),
        },
        Ok((existing, false)) => answer_for_known_key(existing, &new),
        Err(error) => ledger_error(error),
    }
}

/// Aborts the process when the response is marked `AbortAfterCommit`: it
/// runs outside the idempotency layer, so the record (and, in transactional
/// mode, the charge with it) is committed and the client gets nothing.
async fn abort_after_commit(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    if response.extensions().get::<AbortAfterCommit>().is_some() {
        eprintln!("payment_api: simulated abort after the commit, before the answer");
        std::process::abort();
    }
    response
}

/// The answer to a request whose key the ledger already charged: that
/// charge when the request asks for the same amount, currency and source;
/// otherwise 422, marked "do not store" so that the layer keeps no record of
/// it and the key's own client still gets its charge.
fn answer_for_known_key((charge, source): (Charge, String), new: &NewCharge) -> Response {
    // A charge from a ledger that kept no source yet matches on the rest.
    let same_source = source.is_empty() || source == new.source;
    if charge.amount == new.amount && charge.currency == new.currency && same_source {
        return (StatusCode::OK, Json(charge)).into_response();
    }
    let mut response = stripe_error(
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_error",
        None,
        "Keys for idempotent requests can only be used with the same parameters they were first used with.",
    );
    response.extensions_mut().insert(StoreResponse::Never);
    response
}

/// `amount=500&currency=usd&source=tok_visa&metadata[order]=7`, as Stripe's
/// v1 API takes it.
fn parse_form(body: &[u8]) -> Result<NewCharge, String> {
    let text = std::str::from_utf8(body).map_err(|_| "The body is not UTF-8.".to_owned())?;
    let mut fields = HashMap::new();
    let mut metadata = BTreeMap::new();
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let (name, value) = (percent_decode(name), percent_decode(value));
        match name.strip_prefix("metadata[").and_then(|rest| rest.strip_suffix(']')) {
            Some(key) => {
                metadata.insert(key.to_owned(), value);
            }
            None => {
                fields.insert(name, value);
            }
        }
    }
    let field = |name: &str| fields.get(name).cloned().ok_or_else(|| format!("Missing required param: {name}."));
    Ok(NewCharge {
        amount: field("amount")?.parse().map_err(|_| "Invalid integer: amount.".to_owned())?,
        currency: field("currency")?,
        source: field("source")?,
        description: fields.get("description").cloned(),
        metadata,
    })
}

fn parse_json(body: &[u8]) -> Result<NewCharge, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("Invalid JSON: {e}."))?;
    let text = |name: &str| value.get(name).and_then(Value::as_str).map(str::to_owned);
    let metadata = match value.get("metadata") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(Value::Object(map)) => {
            map.iter().map(|(k, v)| (k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_owned))).collect()
        }
        Some(_) => return Err("Invalid object: metadata.".to_owned()),
    };
    Ok(NewCharge {
        amount: value.get("amount").and_then(Value::as_i64).ok_or("Missing required param: amount.")?,
        currency: text("currency").ok_or("Missing required param: currency.")?,
        source: text("source").ok_or("Missing required param: source.")?,
        description: text("description"),
        metadata,
    })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match text.get(i + 1..i + 3).and_then(|hex| u8::from_str_radix(hex, 16).ok()) {
                Some(b) => {
                    out.push(b);
                    i += 2;
                }
                None => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn list_charges<St>(
    State(state): State<AppState<St>>,
    Extension(ApiKey(api_key)): Extension<ApiKey>,
) -> Response {
    let payments = state.payments.clone();
    match payments.charges(&api_key).await {
        Ok(data) => {
            Json(json!({ "object": "list", "url": "/v1/charges", "has_more": false, "data": data })).into_response()
        }
        Err(error) => ledger_error(error),
    }
}

async fn get_charge<St>(
    State(state): State<AppState<St>>,
    Extension(ApiKey(api_key)): Extension<ApiKey>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    let payments = state.payments.clone();
    match payments.charges(&api_key).await {
        Ok(charges) => match charges.into_iter().find(|charge| charge.id == id) {
            Some(charge) => Json(charge).into_response(),
            None => stripe_error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("resource_missing"),
                &format!("No such charge: '{id}'"),
            ),
        },
        Err(error) => ledger_error(error),
    }
}

/// How often the charge handler ran: more runs than keys would mean the
/// layer let a duplicate through (and the ledger caught it).
async fn stats<St>(State(state): State<AppState<St>>) -> Response {
    Json(json!({ "executions": state.payments.executions() })).into_response()
}

async fn key_state<St: Store + Clone>(
    State(state): State<AppState<St>>,
    Extension(ApiKey(api_key)): Extension<ApiKey>,
    UrlPath(key): UrlPath<String>,
) -> Response {
    let missing = || {
        stripe_error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("resource_missing"),
            "No such idempotency key.",
        )
    };
    let Ok(key) = key.parse::<IdempotencyKey>() else { return missing() };
    match state.layer.lookup(&Scope::hashed(api_key.as_bytes()), &key).await {
        Ok(Some(RecordState::InFlight { fencing_token, .. })) => Json(json!({
            "object": "idempotency_key",
            "key": key.as_str(),
            "state": "in_flight",
            "fencing_token": fencing_token.map(|token| token.get()),
        }))
        .into_response(),
        Ok(Some(RecordState::Completed(record))) => Json(json!({
            "object": "idempotency_key",
            "key": key.as_str(),
            "state": "completed",
            "status": record.response().map(|response| response.status().as_u16()),
        }))
        .into_response(),
        Ok(Some(_)) | Ok(None) => missing(),
        Err(error) => stripe_error(StatusCode::SERVICE_UNAVAILABLE, "api_error", None, &error.to_string()),
    }
}
