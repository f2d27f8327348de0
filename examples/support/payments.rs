//! The payment API of `examples/payment_api.rs`: a small copy of Stripe's v1
//! charges API with a SQLite ledger, shared with `examples/retry_storm.rs`
//! and the tests.
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

/// The ledger and the simulated card processor.
pub struct Payments {
    ledger: Mutex<rusqlite::Connection>,
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
        Ok(Arc::new(Self {
            ledger: Mutex::new(ledger),
            processor_latency,
            executions: AtomicU64::new(0),
            ids: RandomState::new(),
            next_id: AtomicU64::new(0),
        }))
    }

    /// How many times the charge handler ran.
    pub fn executions(&self) -> u64 {
        self.executions.load(Ordering::SeqCst)
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, rusqlite::Connection> {
        self.ledger.lock().unwrap_or_else(|poison| poison.into_inner())
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
    /// the source it charged.
    fn find_by_key(&self, api_key: &str, idempotency_key: &str) -> rusqlite::Result<Option<(Charge, String)>> {
        self.ledger()
            .query_row(
                "SELECT id, amount, currency, status, paid, created, description, metadata, source
                 FROM charges WHERE api_key = ?1 AND idempotency_key = ?2",
                params![api_key, idempotency_key],
                |row| Ok((charge_from_row(row)?, row.get(8)?)),
            )
            .optional()
    }

    /// Records `charge` of `source`; when the ledger already holds one for
    /// this key (a second execution that slipped past the layer), returns
    /// that one and its source.
    fn insert(
        &self,
        api_key: &str,
        idempotency_key: &str,
        charge: &Charge,
        source: &str,
    ) -> rusqlite::Result<((Charge, String), bool)> {
        let inserted = self.ledger().execute(
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
        let existing = self.find_by_key(api_key, idempotency_key)?;
        Ok((existing.unwrap_or_else(|| (charge.clone(), source.to_owned())), false))
    }

    /// Every charge of one caller, oldest first.
    pub fn charges(&self, api_key: &str) -> rusqlite::Result<Vec<Charge>> {
        let ledger = self.ledger();
        let mut statement = ledger.prepare(
            "SELECT id, amount, currency, status, paid, created, description, metadata
             FROM charges WHERE api_key = ?1 ORDER BY created, rowid",
        )?;
        let rows = statement.query_map(params![api_key], charge_from_row)?;
        rows.collect()
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
        .route("/v1/charges", post(create_charge::<St>).get(list_charges::<St>))
        .route("/v1/charges/{id}", get(get_charge::<St>))
        .route("/v1/idempotency/{key}", get(key_state::<St>))
        .route("/internal/stats", get(stats::<St>))
        .layer(layer)
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
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let payments = state.payments.clone();
    payments.executions.fetch_add(1, Ordering::SeqCst);
    let is_json = headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let new = match if is_json { parse_json(&body) } else { parse_form(&body) } {
        Ok(new) => new,
        Err(message) => return stripe_error(StatusCode::BAD_REQUEST, "invalid_request_error", None, &message),
    };
    // The second line of defence: a key the ledger already knows gets the
    // charge it made, never a new one; asked with another payload, 422.
    let key = context.derived_key();
    let lookup = {
        let (payments, api_key, key) = (payments.clone(), api_key.clone(), key.clone());
        tokio::task::spawn_blocking(move || payments.find_by_key(&api_key, &key)).await
    };
    match lookup {
        Ok(Ok(Some(existing))) => return answer_for_known_key(existing, &new),
        Ok(Ok(None)) => {}
        Ok(Err(error)) => return ledger_error(error),
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
    let crash = new.metadata.get("simulate").is_some_and(|v| v == "crash_after_charge");
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
    let source = new.source.clone();
    let inserted = tokio::task::spawn_blocking(move || payments.insert(&api_key, &key, &charge, &source)).await;
    match inserted {
        Ok(Ok(((charge, _), true))) => {
            if crash {
                panic!("simulated crash after charging {}", charge.id);
            }
            (StatusCode::OK, Json(charge)).into_response()
        }
        Ok(Ok((existing, false))) => answer_for_known_key(existing, &new),
        Ok(Err(error)) => ledger_error(error),
        Err(error) => ledger_error(error),
    }
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
    match tokio::task::spawn_blocking(move || payments.charges(&api_key)).await {
        Ok(Ok(data)) => {
            Json(json!({ "object": "list", "url": "/v1/charges", "has_more": false, "data": data })).into_response()
        }
        Ok(Err(error)) => ledger_error(error),
        Err(error) => ledger_error(error),
    }
}

async fn get_charge<St>(
    State(state): State<AppState<St>>,
    Extension(ApiKey(api_key)): Extension<ApiKey>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    let payments = state.payments.clone();
    match tokio::task::spawn_blocking(move || payments.charges(&api_key)).await {
        Ok(Ok(charges)) => match charges.into_iter().find(|charge| charge.id == id) {
            Some(charge) => Json(charge).into_response(),
            None => stripe_error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("resource_missing"),
                &format!("No such charge: '{id}'"),
            ),
        },
        Ok(Err(error)) => ledger_error(error),
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
            "fencing_token": fencing_token.get(),
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
