//! A payment API shaped like Stripe's v1 charges, guarded by
//! `IdempotencyLayer` on the in-memory store.
//!
//! ```text
//! cargo run --release --example payment_api -- --addr 127.0.0.1:3000
//! curl -s localhost:3000/v1/charges -u sk_test_1: -H 'Idempotency-Key: order-1' \
//!      -d amount=500 -d currency=usd -d source=tok_visa
//! ```
//!
//! Send the same request twice: one charge, the same answer, the second with
//! `Idempotent-Replayed: true`.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{
    Json, Router,
    extract::{Path, Request, State},
    http::{HeaderMap, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tower_idempotency::{IdempotencyContext, IdempotencyKey, IdempotencyLayer, Scope, store::RecordState};

#[derive(Clone, Serialize)]
struct Charge {
    id: String,
    object: &'static str,
    amount: u64,
    currency: String,
    status: &'static str,
    paid: bool,
    created: u64,
    description: Option<String>,
    metadata: HashMap<String, String>,
}

#[derive(Deserialize)]
struct NewCharge {
    amount: u64,
    currency: String,
    source: String,
    description: Option<String>,
}

/// The caller, from `Authorization: Bearer <api key>` (or basic auth with
/// the key as user name, as `curl -u sk_test_1:` sends it).
#[derive(Clone)]
struct ApiKey(String);

#[derive(Clone)]
struct App {
    layer: IdempotencyLayer,
    /// Charges per API key; and per (API key, derived idempotency key), the
    /// ledger's second line of defence.
    ledger: Arc<Mutex<Ledger>>,
    next_id: Arc<AtomicU64>,
}

#[derive(Default)]
struct Ledger {
    charges: HashMap<String, Vec<Charge>>,
    by_key: HashMap<(String, String), Charge>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = parse_addr()?;
    let layer = IdempotencyLayer::memory()
        .with_key_required_if(|parts: &http::request::Parts| parts.uri.path() == "/v1/charges")
        .with_scope(|parts: &http::request::Parts| {
            parts.extensions.get::<ApiKey>().map(|key| Scope::hashed(key.0.as_bytes()))
        });
    let app = App { layer: layer.clone(), ledger: Arc::default(), next_id: Arc::new(AtomicU64::new(1)) };
    let router = Router::new()
        .route("/v1/charges", post(create_charge).get(list_charges))
        .route("/v1/charges/{id}", get(get_charge))
        .route("/v1/idempotency/{key}", get(key_state))
        .layer(layer)
        .layer(middleware::from_fn(authenticate))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("payment_api listening on http://{} (in-memory store)", listener.local_addr()?);
    axum::serve(listener, router).with_graceful_shutdown(shutdown()).await?;
    Ok(())
}

fn parse_addr() -> Result<SocketAddr, String> {
    let mut args = std::env::args().skip(1);
    let mut addr = "127.0.0.1:3000".to_owned();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--addr" => addr = args.next().ok_or("--addr needs a value")?,
            other => return Err(format!("unknown argument {other}; usage: payment_api [--addr HOST:PORT]")),
        }
    }
    addr.parse().map_err(|e| format!("--addr {addr}: {e}"))
}

async fn shutdown() {
    let _ = tokio::signal::ctrl_c().await;
}

async fn authenticate(mut request: Request, next: Next) -> Response {
    match api_key(request.headers()) {
        Some(key) => {
            request.extensions_mut().insert(ApiKey(key));
            next.run(request).await
        }
        None => stripe_error(StatusCode::UNAUTHORIZED, "invalid_request_error", None, "No valid API key provided."),
    }
}

fn api_key(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    if let Some(token) = value.strip_prefix("Bearer ") {
        return Some(token.trim().to_owned()).filter(|t| !t.is_empty());
    }
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64_decode(encoded.trim())?;
    let user = decoded.split(':').next()?.to_owned();
    Some(user).filter(|u| !u.is_empty())
}

fn base64_decode(input: &str) -> Option<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut count = 0;
    let mut out = Vec::new();
    for c in input.bytes().filter(|&c| c != b'=') {
        let value = ALPHABET.iter().position(|&a| a == c)? as u32;
        bits = (bits << 6) | value;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
        }
    }
    String::from_utf8(out).ok()
}

fn stripe_error(status: StatusCode, kind: &str, code: Option<&str>, message: &str) -> Response {
    (status, Json(json!({ "error": { "type": kind, "code": code, "message": message } }))).into_response()
}

async fn create_charge(State(app): State<App>, request: Request) -> Response {
    let Some(ApiKey(api_key)) = request.extensions().get::<ApiKey>().cloned() else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    // Always there: the layer requires a key on this route.
    let Some(context) = request.extensions().get::<IdempotencyContext>().cloned() else {
        return stripe_error(StatusCode::BAD_REQUEST, "idempotency_error", None, "Idempotency-Key required.");
    };
    let is_json =
        request.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let Ok(body) = axum::body::to_bytes(request.into_body(), 1 << 20).await else {
        return stripe_error(StatusCode::BAD_REQUEST, "invalid_request_error", None, "Unreadable body.");
    };
    let parsed: Result<NewCharge, String> =
        if is_json { serde_json::from_slice(&body).map_err(|e| e.to_string()) } else { serde_urlencoded_parse(&body) };
    let new = match parsed {
        Ok(new) => new,
        Err(error) => return stripe_error(StatusCode::BAD_REQUEST, "invalid_request_error", None, &error),
    };
    let ledger_key = (api_key.clone(), context.derived_key());
    if let Some(existing) = app.ledger.lock().unwrap_or_else(|p| p.into_inner()).by_key.get(&ledger_key) {
        // The second line of defence: the ledger already has this key.
        return (StatusCode::OK, Json(existing.clone())).into_response();
    }
    if new.source == "tok_chargeDeclined" {
        return stripe_error(
            StatusCode::PAYMENT_REQUIRED,
            "card_error",
            Some("card_declined"),
            "Your card was declined.",
        );
    }
    let charge = Charge {
        id: format!("ch_{:016x}", app.next_id.fetch_add(1, Ordering::Relaxed) ^ 0x5eed_cafe_f00d_0000),
        object: "charge",
        amount: new.amount,
        currency: new.currency,
        status: "succeeded",
        paid: true,
        created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        description: new.description,
        metadata: HashMap::new(),
    };
    let mut ledger = app.ledger.lock().unwrap_or_else(|p| p.into_inner());
    ledger.charges.entry(api_key).or_default().push(charge.clone());
    ledger.by_key.insert(ledger_key, charge.clone());
    (StatusCode::OK, Json(charge)).into_response()
}

/// `amount=500&currency=usd&source=tok_visa`, as Stripe's v1 API takes it.
fn serde_urlencoded_parse(body: &[u8]) -> Result<NewCharge, String> {
    let text = std::str::from_utf8(body).map_err(|_| "body is not UTF-8".to_owned())?;
    let mut fields = HashMap::new();
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        fields.insert(percent_decode(name), percent_decode(value));
    }
    let field = |name: &str| fields.get(name).cloned().ok_or_else(|| format!("Missing required param: {name}."));
    Ok(NewCharge {
        amount: field("amount")?.parse().map_err(|_| "Invalid integer: amount.".to_owned())?,
        currency: field("currency")?,
        source: field("source")?,
        description: fields.get("description").cloned(),
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

async fn list_charges(State(app): State<App>, request: Request) -> Response {
    let api_key = request.extensions().get::<ApiKey>().map(|k| k.0.clone()).unwrap_or_default();
    let ledger = app.ledger.lock().unwrap_or_else(|p| p.into_inner());
    let data = ledger.charges.get(&api_key).cloned().unwrap_or_default();
    Json(json!({ "object": "list", "data": data })).into_response()
}

async fn get_charge(State(app): State<App>, Path(id): Path<String>, request: Request) -> Response {
    let api_key = request.extensions().get::<ApiKey>().map(|k| k.0.clone()).unwrap_or_default();
    let ledger = app.ledger.lock().unwrap_or_else(|p| p.into_inner());
    match ledger.charges.get(&api_key).and_then(|charges| charges.iter().find(|c| c.id == id)) {
        Some(charge) => Json(charge.clone()).into_response(),
        None => {
            stripe_error(StatusCode::NOT_FOUND, "invalid_request_error", Some("resource_missing"), "No such charge.")
        }
    }
}

async fn key_state(State(app): State<App>, Path(key): Path<String>, request: Request) -> Response {
    let Some(ApiKey(api_key)) = request.extensions().get::<ApiKey>().cloned() else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    let Ok(key) = key.parse::<IdempotencyKey>() else {
        return stripe_error(StatusCode::BAD_REQUEST, "invalid_request_error", None, "Invalid idempotency key.");
    };
    let missing =
        || stripe_error(StatusCode::NOT_FOUND, "invalid_request_error", Some("resource_missing"), "No such key.");
    match app.layer.lookup(&Scope::hashed(api_key.as_bytes()), &key).await {
        Ok(Some(RecordState::InFlight { fencing_token, .. })) => {
            Json(json!({ "key": key.as_str(), "state": "in_flight", "fencing_token": fencing_token.get() }))
                .into_response()
        }
        Ok(Some(RecordState::Completed(record))) => {
            let status = record.response().map(|r| r.status().as_u16());
            Json(json!({ "key": key.as_str(), "state": "completed", "status": status })).into_response()
        }
        Ok(Some(_)) | Ok(None) => missing(),
        Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}
