//! Every rule of the behaviour contract, through the public API, on the
//! memory store.

mod common;

use std::{convert::Infallible, time::Duration};

use bytes::Bytes;
use common::*;
use futures_util::{StreamExt, stream};
use http::{HeaderMap, Method, Request, Response, header};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::sync::mpsc;
use tower::ServiceExt;
use tower_idempotency::{
    CompletedStrategy, FailureMode, IdempotencyContext, IdempotencyLayer, InFlightPolicy, Outcome, RecordId,
    RequestBody, Scope, StoreResponse,
    store::{Claim, ClaimRequest, MemoryStore, OwnerToken, RecordState, Store, StoreError},
};

const KEY: Option<&str> = Some("order-1");

// ---- which requests are guarded -------------------------------------------

#[tokio::test]
async fn unguarded_methods_and_keyless_requests_pass_through_untouched() {
    let (app, calls) = counting(&IdempotencyLayer::memory());
    for _ in 0..2 {
        let get = Request::get("/v1/charges").header("idempotency-key", "k").body(Full::default()).unwrap();
        assert_eq!(send(&app, get).await.status, 201);
    }
    let first = send(&app, post(None, "a=1")).await;
    let second = send(&app, post(None, "a=1")).await;
    assert!(!first.replayed() && !second.replayed());
    assert_eq!(calls.get(), 4, "nothing is deduplicated without a key or on GET");
    assert!(String::from_utf8_lossy(&second.body).contains("a=1"), "the body reaches the handler intact");
}

#[tokio::test]
async fn required_key_missing_is_400() {
    let (app, calls) = counting(&IdempotencyLayer::memory().with_key_required(true));
    let answer = send(&app, post(None, "a=1")).await;
    assert_eq!((answer.status.as_u16(), answer.problem().as_str()), (400, "missing-key"));
    assert_eq!(calls.get(), 0);
}

#[tokio::test]
async fn key_required_by_predicate_only_where_it_says() {
    let layer = IdempotencyLayer::memory()
        .with_key_required_if(|parts: &http::request::Parts| parts.uri.path() == "/v1/charges");
    let (app, calls) = counting(&layer);
    assert_eq!(send(&app, post(None, "a=1")).await.status, 400);
    let elsewhere = Request::post("/v1/refunds").body(Full::default()).unwrap();
    assert_eq!(send(&app, elsewhere).await.status, 201);
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn configured_methods_and_header_name() {
    let layer = IdempotencyLayer::memory()
        .with_methods([Method::PUT])
        .with_header(http::HeaderName::from_static("x-request-key"));
    let (app, calls) = counting(&layer);
    let put = || Request::put("/x").header("x-request-key", "k").body(Full::default()).unwrap();
    send(&app, put()).await;
    assert!(send(&app, put()).await.replayed());
    // POST is no longer guarded.
    let post_with_key = || Request::post("/x").header("x-request-key", "k").body(Full::default()).unwrap();
    send(&app, post_with_key()).await;
    send(&app, post_with_key()).await;
    assert_eq!(calls.get(), 3);
}

#[tokio::test]
async fn invalid_keys_are_400_and_run_nothing() {
    let (app, calls) = counting(&IdempotencyLayer::memory());
    let long = "k".repeat(256);
    let values: Vec<&[u8]> = vec![b"", b"\"\"", long.as_bytes(), "clé".as_bytes(), b"a\tb", b"a b", b"\"unterminated"];
    for value in values {
        let request = Request::post("/v1/charges")
            .header("idempotency-key", http::HeaderValue::from_bytes(value).unwrap())
            .body(Full::default())
            .unwrap();
        let answer = send(&app, request).await;
        assert_eq!((answer.status.as_u16(), answer.problem()), (400, "invalid-key".to_owned()), "{value:?}");
    }
    let twice = Request::post("/v1/charges")
        .header("idempotency-key", "a")
        .header("idempotency-key", "a")
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&app, twice).await.problem(), "invalid-key");
    assert_eq!(calls.get(), 0);
}

#[tokio::test]
async fn quoted_and_bare_forms_of_a_key_are_the_same_key() {
    let (app, calls) = counting(&IdempotencyLayer::memory());
    send(&app, post(Some("abc"), "a=1")).await;
    assert!(send(&app, post(Some("\"abc\""), "a=1")).await.replayed());
    // Keys are case-sensitive.
    assert!(!send(&app, post(Some("ABC"), "a=1")).await.replayed());
    assert_eq!(calls.get(), 2);
}

// ---- replay ---------------------------------------------------------------

#[tokio::test]
async fn duplicate_replays_status_headers_and_body_byte_for_byte() {
    let layer = IdempotencyLayer::memory();
    let (app, calls) = counting(&layer);
    let first = send(&app, post(KEY, "amount=100")).await;
    let second = send(&app, post(KEY, "amount=100")).await;
    assert_eq!(first.status, 201);
    assert!(!first.replayed());
    assert!(second.replayed());
    assert_eq!(second.status, first.status);
    assert_eq!(second.headers_but_replayed(), first.headers);
    assert_eq!(second.body, first.body);
    assert_eq!(calls.get(), 1);
    let metrics = layer.metrics();
    assert_eq!((metrics.get(Outcome::Executed), metrics.get(Outcome::Replayed)), (1, 1));
}

fn streaming_body(chunks: &[&'static str], trailers: Option<HeaderMap>) -> TestBody {
    let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = chunks
        .iter()
        .map(|chunk| Ok(Frame::data(Bytes::from_static(chunk.as_bytes()))))
        .chain(trailers.map(|t| Ok(Frame::trailers(t))))
        .collect();
    // Yield between frames, so the body really streams.
    let frames = stream::iter(frames).then(|frame| async move {
        tokio::task::yield_now().await;
        frame
    });
    BodyExt::boxed(StreamBody::new(frames))
}

#[tokio::test]
async fn multi_chunk_bodies_and_trailers_replay_identically() {
    let layer = IdempotencyLayer::memory();
    let (app, calls) = counted(&layer, move |_, _| async {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        trailers.insert("x-checksum", "abc".parse().unwrap());
        let mut response = Response::new(streaming_body(&["part one, ", "part two, ", "part three"], Some(trailers)));
        response.headers_mut().append("set-cookie", "a=1".parse().unwrap());
        response.headers_mut().append("set-cookie", "b=2".parse().unwrap());
        response
    });
    let first = send(&app, post(KEY, "x")).await;
    let second = send(&app, post(KEY, "x")).await;
    assert_eq!(first.body, "part one, part two, part three");
    assert_eq!(second.body, first.body);
    assert_eq!(second.trailers, first.trailers);
    assert_eq!(second.trailers.as_ref().unwrap()["x-checksum"], "abc");
    assert_eq!(second.headers.get_all("set-cookie").iter().count(), 2);
    assert!(second.replayed());
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn hop_by_hop_headers_are_not_replayed() {
    let layer = IdempotencyLayer::memory();
    let app = app(&layer, |_| async {
        let mut response = respond(200, "ok");
        response.headers_mut().insert("connection", "x-private".parse().unwrap());
        response.headers_mut().insert("x-private", "1".parse().unwrap());
        response.headers_mut().insert("keep-alive", "timeout=5".parse().unwrap());
        response.headers_mut().insert("x-kept", "1".parse().unwrap());
        response
    });
    send(&app, post(KEY, "")).await;
    let replay = send(&app, post(KEY, "")).await;
    for name in ["connection", "x-private", "keep-alive"] {
        assert!(!replay.headers.contains_key(name), "{name} replayed");
    }
    assert_eq!(replay.headers["x-kept"], "1");
}

// ---- fingerprint and scope -------------------------------------------------

#[tokio::test]
async fn same_key_different_payload_is_422() {
    let layer = IdempotencyLayer::memory();
    let (app, calls) = counting(&layer);
    send(&app, post(KEY, "amount=100")).await;
    let other_body = send(&app, post(KEY, "amount=999")).await;
    assert_eq!((other_body.status.as_u16(), other_body.problem().as_str()), (422, "key-reused"));
    let other_path = Request::post("/v1/refunds")
        .header("idempotency-key", "order-1")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from("amount=100")))
        .unwrap();
    assert_eq!(send(&app, other_path).await.status, 422);
    let other_type = Request::post("/v1/charges")
        .header("idempotency-key", "order-1")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from("amount=100")))
        .unwrap();
    assert_eq!(send(&app, other_type).await.status, 422);
    assert_eq!(calls.get(), 1);
    assert_eq!(layer.metrics().get(Outcome::Mismatch), 3);
}

#[tokio::test]
async fn mismatch_beats_in_flight() {
    let gate = Gate::default();
    let layer = IdempotencyLayer::memory();
    let held = gate.clone();
    let app = app(&layer, move |_| {
        let held = held.clone();
        async move {
            held.pass().await;
            respond(200, "done")
        }
    });
    let first = tokio::spawn(send_owned(app.clone(), post(KEY, "amount=100")));
    gate.entered(1).await;
    assert_eq!(send(&app, post(KEY, "amount=999")).await.status, 422);
    assert_eq!(send(&app, post(KEY, "amount=100")).await.status, 409);
    gate.open(1);
    assert_eq!(first.await.unwrap().status, 200);
}

async fn send_owned(app: App, request: Request<Full<Bytes>>) -> Answer {
    send(&app, request).await
}

fn with_auth(key: &str, token: &str, body: &'static str) -> Request<Full<Bytes>> {
    let mut request = post(Some(key), body);
    request.headers_mut().insert(header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
    request
}

#[tokio::test]
async fn callers_never_see_each_others_replays() {
    let layer = IdempotencyLayer::memory();
    let (app, calls) = counting(&layer);
    let alice = send(&app, with_auth("k", "sk_alice", "amount=1")).await;
    let bob = send(&app, with_auth("k", "sk_bob", "amount=1")).await;
    assert!(!bob.replayed(), "bob must not get alice's response");
    assert_ne!(alice.body, bob.body);
    assert!(send(&app, with_auth("k", "sk_alice", "amount=1")).await.replayed());
    assert_eq!(calls.get(), 2);
}

#[tokio::test]
async fn custom_scope_and_missing_scope() {
    #[derive(Clone)]
    struct Tenant(&'static str);
    let layer = IdempotencyLayer::memory()
        .with_scope(|parts: &http::request::Parts| parts.extensions.get::<Tenant>().map(|t| Scope::new(t.0)));
    let (app, calls) = counting(&layer);
    let as_tenant = |tenant: &'static str| {
        let mut request = post(KEY, "a");
        request.extensions_mut().insert(Tenant(tenant));
        request
    };
    send(&app, as_tenant("t1")).await;
    assert!(send(&app, as_tenant("t1")).await.replayed());
    assert!(!send(&app, as_tenant("t2")).await.replayed());
    let nobody = send(&app, post(KEY, "a")).await;
    assert_eq!((nobody.status.as_u16(), nobody.problem().as_str()), (400, "missing-scope"));
    assert_eq!(calls.get(), 2);
}

#[tokio::test]
async fn fingerprinted_headers_are_configurable() {
    let layer = IdempotencyLayer::memory().with_fingerprint_headers([http::HeaderName::from_static("x-currency")]);
    let (app, calls) = counting(&layer);
    let with_currency = |currency: &str| {
        let mut request = post(KEY, "amount=1");
        request.headers_mut().insert("x-currency", currency.parse().unwrap());
        request
    };
    send(&app, with_currency("usd")).await;
    assert_eq!(send(&app, with_currency("eur")).await.status, 422);
    assert!(send(&app, with_currency("usd")).await.replayed());
    assert_eq!(calls.get(), 1);
}

// ---- in-flight duplicates --------------------------------------------------

/// A handler that waits at the returned gate on every call, then answers
/// 201 `charge {n}`.
fn held_at_gate(layer: &IdempotencyLayer) -> (App, Gate, Calls) {
    let gate = Gate::default();
    let held = gate.clone();
    let (app, calls) = counted(layer, move |n, _| {
        let held = held.clone();
        async move {
            held.pass().await;
            respond(201, format!("charge {n}"))
        }
    });
    (app, gate, calls)
}

/// A layer whose handler waits at a gate, and the first request parked in it.
async fn parked(layer: IdempotencyLayer) -> (App, Gate, Calls, tokio::task::JoinHandle<Answer>) {
    let (app, gate, calls) = held_at_gate(&layer);
    let first = tokio::spawn(send_owned(app.clone(), post(KEY, "amount=100")));
    gate.entered(1).await;
    (app, gate, calls, first)
}

#[tokio::test]
async fn in_flight_conflict_is_409_with_retry_after() {
    let layer = IdempotencyLayer::memory().with_retry_after(Duration::from_secs(3));
    let (app, gate, calls, first) = parked(layer.clone()).await;
    let duplicate = send(&app, post(KEY, "amount=100")).await;
    assert_eq!((duplicate.status.as_u16(), duplicate.problem().as_str()), (409, "in-flight"));
    assert_eq!(duplicate.headers[header::RETRY_AFTER], "3");
    gate.open(1);
    let first = first.await.unwrap();
    assert_eq!(first.body, "charge 1");
    assert_eq!(send(&app, post(KEY, "amount=100")).await.body, "charge 1");
    assert_eq!(calls.get(), 1);
    assert_eq!(layer.metrics().get(Outcome::InFlight), 1);
}

#[tokio::test]
async fn in_flight_accepted_is_202_with_status_url() {
    let policy = InFlightPolicy::Accepted { status_url: Some("/v1/idempotency/{key}".into()) };
    let (app, gate, calls, first) = parked(IdempotencyLayer::memory().with_in_flight(policy)).await;
    let duplicate = send(&app, post(KEY, "amount=100")).await;
    assert_eq!(duplicate.status, 202);
    assert_eq!(duplicate.headers[header::LOCATION], "/v1/idempotency/order-1");
    assert!(duplicate.headers.contains_key(header::RETRY_AFTER));
    gate.open(1);
    first.await.unwrap();
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn in_flight_wait_replays_the_first_answer() {
    let layer = IdempotencyLayer::memory().with_in_flight(InFlightPolicy::Wait(Duration::from_secs(30)));
    let (app, gate, calls, first) = parked(layer).await;
    let waiters: Vec<_> = (0..3).map(|_| tokio::spawn(send_owned(app.clone(), post(KEY, "amount=100")))).collect();
    gate.open(1);
    let first = first.await.unwrap();
    for waiter in waiters {
        let answer = waiter.await.unwrap();
        assert!(answer.replayed());
        assert_eq!((answer.status, &answer.body), (first.status, &first.body));
    }
    assert_eq!(calls.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn in_flight_wait_times_out_to_409() {
    let layer = IdempotencyLayer::memory().with_in_flight(InFlightPolicy::Wait(Duration::from_secs(2)));
    let (app, gate, calls, first) = parked(layer).await;
    let duplicate = send(&app, post(KEY, "amount=100")).await;
    assert_eq!(duplicate.status, 409);
    gate.open(1);
    first.await.unwrap();
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn waiting_duplicate_runs_itself_when_the_first_fails() {
    let layer = IdempotencyLayer::memory().with_in_flight(InFlightPolicy::Wait(Duration::from_secs(30)));
    let gate = Gate::default();
    let calls = Calls::default();
    let (held, counter) = (gate.clone(), calls.clone());
    let app = app(&layer, move |_| {
        let (held, n) = (held.clone(), counter.bump());
        async move {
            if n == 1 {
                held.pass().await;
                return respond(503, "processor down");
            }
            respond(201, "charged by the retry")
        }
    });
    let first = tokio::spawn(send_owned(app.clone(), post(KEY, "a")));
    gate.entered(1).await;
    let waiter = tokio::spawn(send_owned(app.clone(), post(KEY, "a")));
    gate.open(1);
    assert_eq!(first.await.unwrap().status, 503);
    let retried = waiter.await.unwrap();
    assert_eq!((retried.status.as_u16(), &retried.body[..]), (201, &b"charged by the retry"[..]));
    assert_eq!(calls.get(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_simultaneous_duplicates_execute_once() {
    let (app, gate, calls) = held_at_gate(&IdempotencyLayer::memory());
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(64));
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (app, barrier) = (app.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                send(&app, post(KEY, "amount=100")).await
            })
        })
        .collect();
    gate.entered(1).await;
    gate.open(1);
    let mut executed = 0;
    for task in tasks {
        let answer = task.await.unwrap();
        match answer.status.as_u16() {
            201 => {
                assert_eq!(answer.body, "charge 1");
                executed += usize::from(!answer.replayed());
            }
            409 => assert_eq!(answer.problem(), "in-flight"),
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!((calls.get(), executed), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_waiting_duplicates_all_get_the_same_bytes() {
    let layer = IdempotencyLayer::memory().with_in_flight(InFlightPolicy::Wait(Duration::from_secs(30)));
    let (app, calls) = counting(&layer);
    let tasks: Vec<_> = (0..64).map(|_| tokio::spawn(send_owned(app.clone(), post(KEY, "amount=100")))).collect();
    let mut bodies = std::collections::HashSet::new();
    for task in tasks {
        let answer = task.await.unwrap();
        assert_eq!(answer.status, 201);
        bodies.insert(answer.body);
    }
    assert_eq!((calls.get(), bodies.len()), (1, 1));
}

// ---- completed-record strategies --------------------------------------------

#[tokio::test]
async fn reject_strategy_refuses_reuse() {
    let (app, calls) = counting(&IdempotencyLayer::memory().with_completed(CompletedStrategy::Reject));
    send(&app, post(KEY, "a")).await;
    let again = send(&app, post(KEY, "a")).await;
    assert_eq!((again.status.as_u16(), again.problem().as_str()), (409, "key-already-used"));
    assert!(!again.headers.contains_key(header::RETRY_AFTER));
    assert_eq!(send(&app, post(KEY, "b")).await.status, 422, "a different payload is still a mismatch");
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn rerun_strategy_runs_a_finished_key_again_with_a_higher_fencing_token() {
    let layer = IdempotencyLayer::memory().with_completed(CompletedStrategy::Rerun);
    let tokens = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = tokens.clone();
    let app = app(&layer, move |request: HandlerRequest| {
        let context = request.extensions().get::<IdempotencyContext>().cloned().unwrap();
        seen.lock().unwrap().push(context.fencing_token());
        async { respond(200, "ran") }
    });
    send(&app, post(KEY, "a")).await;
    assert!(!send(&app, post(KEY, "a")).await.replayed());
    assert!(!send(&app, post(KEY, "another payload")).await.replayed());
    let tokens = tokens.lock().unwrap().clone();
    assert_eq!(tokens.len(), 3);
    assert!(tokens.windows(2).all(|pair| pair[0] < pair[1]), "{tokens:?}");
}

// ---- what is stored ----------------------------------------------------------

/// Answers each call with the next status of `statuses`.
fn scripted(layer: &IdempotencyLayer, statuses: &'static [u16]) -> (App, Calls) {
    let (app, calls) = counted(layer, move |n, _| async move { respond(statuses[n - 1], format!("call {n}")) });
    (app, calls)
}

#[tokio::test]
async fn server_errors_and_transient_4xx_are_not_stored() {
    for status in [500, 502, 503, 408, 425, 429] {
        let statuses: &'static [u16] = Box::leak(Box::new([status, 201, 201]));
        let (app, calls) = scripted(&IdempotencyLayer::memory(), statuses);
        assert_eq!(send(&app, post(KEY, "a")).await.status, status);
        let retry = send(&app, post(KEY, "a")).await;
        assert_eq!((retry.status.as_u16(), retry.replayed()), (201, false), "after {status}");
        assert!(send(&app, post(KEY, "a")).await.replayed());
        assert_eq!(calls.get(), 2);
    }
}

#[tokio::test]
async fn business_errors_are_stored_and_replayed() {
    let (app, calls) = scripted(&IdempotencyLayer::memory(), &[402, 201]);
    assert_eq!(send(&app, post(KEY, "a")).await.status, 402);
    let replay = send(&app, post(KEY, "a")).await;
    assert_eq!((replay.status.as_u16(), replay.replayed()), (402, true));
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn storage_predicate_is_configurable() {
    let layer = IdempotencyLayer::memory().with_store_if(|status| status.is_success());
    let (app, calls) = scripted(&layer, &[402, 201, 201]);
    assert_eq!(send(&app, post(KEY, "a")).await.status, 402);
    assert_eq!(send(&app, post(KEY, "a")).await.status, 201);
    assert!(send(&app, post(KEY, "a")).await.replayed());
    assert_eq!(calls.get(), 2);
}

#[tokio::test]
async fn handler_can_overrule_the_storage_decision() {
    let layer = IdempotencyLayer::memory();
    let (app, calls) = counted(&layer, move |n, request: HandlerRequest| {
        let path = request.uri().path().to_owned();
        async move {
            let (status, verdict) =
                if path == "/always" { (503, StoreResponse::Always) } else { (201, StoreResponse::Never) };
            let mut response = respond(status, format!("call {n}"));
            response.extensions_mut().insert(verdict);
            response
        }
    });
    let to = |path: &str| Request::post(path).header("idempotency-key", "k").body(Full::default()).unwrap();
    send(&app, to("/always")).await;
    assert!(send(&app, to("/always")).await.replayed(), "a 503 marked Always is replayed");
    let key2 = |path: &str| Request::post(path).header("idempotency-key", "k2").body(Full::default()).unwrap();
    send(&app, key2("/never")).await;
    assert!(!send(&app, key2("/never")).await.replayed(), "a 201 marked Never runs again");
    assert_eq!(calls.get(), 3);
}

#[tokio::test]
async fn grpc_status_in_trailers_decides_storage() {
    let layer = IdempotencyLayer::memory();
    let (app, calls) = counted(&layer, move |n, _| {
        async move {
            let code = if n == 1 { "14" } else { "0" }; // UNAVAILABLE, then OK
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", code.parse().unwrap());
            let mut response = Response::new(streaming_body(&["\0\0\0\0\0"], Some(trailers)));
            response.headers_mut().insert("content-type", "application/grpc".parse().unwrap());
            response
        }
    });
    let grpc = || {
        Request::post("/pkg.Svc/Call")
            .header("content-type", "application/grpc")
            .header("idempotency-key", "k")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
            .unwrap()
    };
    assert_eq!(send(&app, grpc()).await.trailers.unwrap()["grpc-status"], "14");
    let second = send(&app, grpc()).await;
    assert_eq!((second.trailers.as_ref().unwrap()["grpc-status"].to_str().unwrap(), second.replayed()), ("0", false));
    let third = send(&app, grpc()).await;
    assert_eq!((third.trailers.as_ref().unwrap()["grpc-status"].to_str().unwrap(), third.replayed()), ("0", true));
    assert_eq!(calls.get(), 2);
}

#[tokio::test]
async fn handler_sees_key_scope_and_fencing_token() {
    let layer = IdempotencyLayer::memory().with_namespace("payments");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
    let slot = seen.clone();
    let app = app(&layer, move |request: HandlerRequest| {
        *slot.lock().unwrap() = request.extensions().get::<IdempotencyContext>().cloned();
        async { respond(200, "") }
    });
    send(&app, with_auth("order-9", "sk_1", "")).await;
    let context = seen.lock().unwrap().clone().expect("context in extensions");
    assert_eq!(context.key().as_str(), "order-9");
    assert_eq!(context.scope(), &Scope::hashed(b"Bearer sk_1"));
    assert!(context.fencing_token().get() > 0);
    let id = RecordId::new("payments", &Scope::hashed(b"Bearer sk_1"), &"order-9".parse().unwrap());
    assert_eq!(context.derived_key(), id.to_hex());
    assert!(!context.derived_key().contains("order-9"));
}

#[tokio::test]
async fn lookup_shows_the_record_state() {
    let layer = IdempotencyLayer::memory();
    let (app, _) = counting(&layer);
    let key = "order-1".parse().unwrap();
    assert!(layer.lookup(&Scope::anonymous(), &key).await.unwrap().is_none());
    send(&app, post(KEY, "a")).await;
    match layer.lookup(&Scope::anonymous(), &key).await.unwrap() {
        Some(RecordState::Completed(record)) => assert_eq!(record.response().unwrap().status(), 201),
        other => panic!("expected completed, got {other:?}"),
    }
    assert!(layer.lookup(&Scope::new("someone else"), &key).await.unwrap().is_none());
}

// ---- bodies -------------------------------------------------------------------

#[tokio::test]
async fn request_body_over_the_cap_is_413_and_runs_nothing() {
    let (app, calls) = counting(&IdempotencyLayer::memory().with_body_limit(8));
    let declared = send(&app, post(KEY, "123456789")).await;
    assert_eq!((declared.status.as_u16(), declared.problem().as_str()), (413, "body-too-large"));
    assert_eq!(send(&app, post(KEY, "12345678")).await.status, 201, "exactly the cap is fine");
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn streamed_request_body_over_the_cap_is_413() {
    let layer = IdempotencyLayer::memory().with_body_limit(8);
    let calls = Calls::default();
    let counter = calls.clone();
    let inner = tower::service_fn(move |_: Request<RequestBody<TestBody>>| {
        counter.bump();
        async { Ok::<_, Infallible>(respond(201, "")) }
    });
    let service = tower::Layer::layer(&layer, inner);
    // No length declared: the cap is found while reading.
    let body = streaming_body(&["12345", "67890"], None);
    let request = Request::post("/").header("idempotency-key", "k").body(body).unwrap();
    let answer = read(service.oneshot(request).await.unwrap()).await;
    assert_eq!(answer.status, 413);
    assert_eq!(calls.get(), 0);
}

#[tokio::test]
async fn failing_request_body_is_400() {
    let layer = IdempotencyLayer::memory();
    let calls = Calls::default();
    let counter = calls.clone();
    let inner = tower::service_fn(move |_: Request<RequestBody<TestBody>>| {
        counter.bump();
        async { Ok::<_, Infallible>(respond(201, "")) }
    });
    let service = tower::Layer::layer(&layer, inner);
    let frames: Vec<Result<Frame<Bytes>, std::io::Error>> =
        vec![Ok(Frame::data(Bytes::from("12"))), Err(std::io::Error::other("connection reset"))];
    let request = Request::post("/")
        .header("idempotency-key", "k")
        .body(BodyExt::boxed(StreamBody::new(stream::iter(frames))))
        .unwrap();
    let answer = read(service.oneshot(request).await.unwrap()).await;
    assert_eq!((answer.status.as_u16(), answer.problem().as_str()), (400, "invalid-body"));
    assert_eq!(calls.get(), 0);
}

#[tokio::test]
async fn response_over_the_storage_cap_is_delivered_once_and_never_rerun() {
    let layer = IdempotencyLayer::memory().with_response_limit(10);
    let (app, calls) =
        counted(&layer, move |_, _| async { Response::new(streaming_body(&["0123456789", "abcdef"], None)) });
    let first = send(&app, post(KEY, "a")).await;
    assert_eq!(first.body, "0123456789abcdef", "delivered in full");
    let duplicate = send(&app, post(KEY, "a")).await;
    assert_eq!((duplicate.status.as_u16(), duplicate.problem().as_str()), (410, "response-not-stored"));
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn a_response_body_that_fails_midway_is_never_rerun() {
    let layer = IdempotencyLayer::memory();
    let (app, calls) = counted(&layer, move |_, _| async {
        let frames =
            stream::iter(vec![Ok(Frame::data(Bytes::from("partial"))), Err(std::io::Error::other("upstream reset"))])
                .then(|frame: Result<Frame<Bytes>, std::io::Error>| async move {
                    tokio::task::yield_now().await;
                    frame
                });
        Response::new(BodyExt::boxed(StreamBody::new(frames)))
    });
    let response = app.clone().oneshot(post(KEY, "a")).await.unwrap();
    assert!(response.into_body().collect().await.is_err(), "the client sees the failure");
    assert_eq!(send(&app, post(KEY, "a")).await.status, 410);
    assert_eq!(calls.get(), 1);
}

// ---- failures of the handler and the client ----------------------------------

#[tokio::test]
async fn panicking_handler_gives_500_and_releases_the_key() {
    // A slow release: the 500 must still wait for it.
    let layer = IdempotencyLayer::new(Slowed { release: Duration::from_millis(100), ..Slowed::default() });
    let (app, calls) = counted(&layer, move |n, _| async move {
        if n == 1 {
            panic!("handler bug");
        }
        respond(201, "second try")
    });
    let crashed = send(&app, post(KEY, "a")).await;
    assert_eq!((crashed.status.as_u16(), crashed.problem().as_str()), (500, "handler-panicked"));
    // The key is released before the 500 goes out: a retry sent at once runs.
    let retry = send(&app, post(KEY, "a")).await;
    assert_eq!((retry.status.as_u16(), &retry.body[..]), (201, &b"second try"[..]));
    assert_eq!(calls.get(), 2);
}

#[tokio::test]
async fn client_disconnect_does_not_stop_the_handler_and_its_result_is_stored() {
    let layer = IdempotencyLayer::memory().with_in_flight(InFlightPolicy::Wait(Duration::from_secs(30)));
    let (app, gate, calls, first) = parked(layer).await;
    first.abort(); // the client goes away while the handler runs
    assert!(first.await.unwrap_err().is_cancelled());
    let retry = tokio::spawn(send_owned(app.clone(), post(KEY, "amount=100")));
    gate.open(1);
    let retry = retry.await.unwrap();
    assert_eq!((retry.status.as_u16(), &retry.body[..], retry.replayed()), (201, &b"charge 1"[..], true));
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn client_disconnect_mid_stream_still_records_the_whole_body() {
    let layer = IdempotencyLayer::memory().with_in_flight(InFlightPolicy::Wait(Duration::from_secs(30)));
    let (chunks, rx) = mpsc::channel::<&'static str>(4);
    let rx = std::sync::Arc::new(std::sync::Mutex::new(Some(rx)));
    let (app, calls) = counted(&layer, move |_, _| {
        let rx = rx.lock().unwrap().take().expect("one execution");
        async move {
            let frames = stream::unfold(rx, |mut rx| async move {
                let chunk = rx.recv().await?;
                Some((Ok::<_, std::io::Error>(Frame::data(Bytes::from(chunk))), rx))
            });
            Response::new(BodyExt::boxed(StreamBody::new(frames)))
        }
    });
    let response = app.clone().oneshot(post(KEY, "a")).await.unwrap();
    let mut body = response.into_body();
    chunks.send("first ").await.unwrap();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "first ");
    drop(body); // the client hangs up mid-stream
    chunks.send("second ").await.unwrap();
    chunks.send("third").await.unwrap();
    drop(chunks);
    let retry = send(&app, post(KEY, "a")).await;
    assert_eq!((&retry.body[..], retry.replayed()), (&b"first second third"[..], true));
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn a_client_that_read_the_whole_stream_gets_the_replay_at_once() {
    // The end of a streamed body is held back until the record is stored,
    // so this duplicate can never see 409.
    let layer = IdempotencyLayer::memory();
    let (app, calls) = counted(&layer, move |_, _| async { Response::new(streaming_body(&["a", "b", "c"], None)) });
    for round in 0..50 {
        let key = format!("k{round}");
        let request = || Request::post("/").header("idempotency-key", key.as_str()).body(Full::default()).unwrap();
        assert_eq!(send(&app, request()).await.body, "abc");
        let replay = send(&app, request()).await;
        assert_eq!((replay.status.as_u16(), replay.replayed()), (200, true), "round {round}");
    }
    assert_eq!(calls.get(), 50);
}

// ---- the store failing ----------------------------------------------------------

/// A store that fails every call, or never answers.
#[derive(Clone)]
struct BrokenStore {
    hang: bool,
}

impl BrokenStore {
    async fn fail<T>(&self) -> Result<T, StoreError> {
        if self.hang {
            std::future::pending::<()>().await;
        }
        Err(StoreError::unavailable("connection refused"))
    }
}

impl Store for BrokenStore {
    async fn claim(&self, _: ClaimRequest) -> Result<Claim, StoreError> {
        self.fail().await
    }
    async fn complete(
        &self,
        _: &RecordId,
        _: OwnerToken,
        _: tower_idempotency::Record,
        _: Duration,
    ) -> Result<(), StoreError> {
        self.fail().await
    }
    async fn release(&self, _: &RecordId, _: OwnerToken) -> Result<(), StoreError> {
        self.fail().await
    }
    async fn renew(&self, _: &RecordId, _: OwnerToken, _: Duration) -> Result<(), StoreError> {
        self.fail().await
    }
    async fn lookup(&self, _: &RecordId) -> Result<Option<RecordState>, StoreError> {
        self.fail().await
    }
}

#[tokio::test]
async fn store_down_fails_closed_with_503_by_default() {
    let layer = IdempotencyLayer::new(BrokenStore { hang: false });
    let (app, calls) = counting(&layer);
    let answer = send(&app, post(KEY, "a")).await;
    assert_eq!((answer.status.as_u16(), answer.problem().as_str()), (503, "store-unavailable"));
    assert!(answer.headers.contains_key(header::RETRY_AFTER));
    assert_eq!(calls.get(), 0);
    assert_eq!(layer.metrics().get(Outcome::StoreError), 1);
}

#[tokio::test]
async fn slow_store_times_out_into_the_failure_path() {
    let layer =
        IdempotencyLayer::new(BrokenStore { hang: true }).with_store_timeout(Duration::from_millis(50)).unwrap();
    let (app, calls) = counting(&layer);
    assert_eq!(send(&app, post(KEY, "a")).await.status, 503);
    assert_eq!(calls.get(), 0);
}

#[tokio::test]
async fn store_down_fails_open_when_configured() {
    let layer = IdempotencyLayer::new(BrokenStore { hang: false }).with_failure_mode(FailureMode::FailOpen);
    let (app, calls) = counting(&layer);
    assert_eq!(send(&app, post(KEY, "a")).await.status, 201);
    assert_eq!(send(&app, post(KEY, "a")).await.status, 201);
    assert_eq!(calls.get(), 2, "unguarded: every request runs");
    assert_eq!(layer.metrics().get(Outcome::FailedOpen), 2);
}

#[tokio::test]
async fn full_memory_store_refuses_new_keys_with_503() {
    let layer = IdempotencyLayer::new(MemoryStore::with_limits(1, usize::MAX));
    let (app, calls) = counting(&layer);
    send(&app, post(Some("a"), "")).await;
    assert!(send(&app, post(Some("a"), "")).await.replayed(), "existing keys keep working");
    assert_eq!(send(&app, post(Some("b"), "")).await.status, 503);
    assert_eq!(calls.get(), 1);
}

// ---- gRPC rejections -------------------------------------------------------------

#[tokio::test]
async fn grpc_requests_get_grpc_statuses_not_problem_json() {
    let (app, calls) = counting(&IdempotencyLayer::memory());
    let grpc = |key: &str| {
        Request::post("/payments.v1.Payments/CreateCharge")
            .header("content-type", "application/grpc+proto")
            .header("idempotency-key", key)
            .body(Full::default())
            .unwrap()
    };
    let invalid = send(&app, grpc("")).await;
    assert_eq!(invalid.status, 200);
    assert_eq!(invalid.headers["grpc-status"], "3"); // INVALID_ARGUMENT
    assert_eq!(invalid.headers["content-type"], "application/grpc");
    assert!(invalid.body.is_empty(), "trailers-only");
    assert_eq!(calls.get(), 0);
}

// ---- leases ------------------------------------------------------------------------

/// A handler that takes `first_takes` on its first call and answers at once
/// after that.
fn slow_first(layer: &IdempotencyLayer, first_takes: Duration) -> (App, Calls) {
    let (app, calls) = counted(layer, move |n, _| async move {
        if n == 1 {
            tokio::time::sleep(first_takes).await;
        }
        respond(201, format!("call {n}"))
    });
    (app, calls)
}

#[tokio::test(start_paused = true)]
async fn lease_is_renewed_while_the_handler_runs() {
    let layer = IdempotencyLayer::memory().with_lease(Duration::from_secs(3)).unwrap();
    let (app, calls) = slow_first(&layer, Duration::from_secs(10));
    let first = tokio::spawn(send_owned(app.clone(), post(KEY, "a")));
    // Well past one lease: only renewals keep the claim alive.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(send(&app, post(KEY, "a")).await.status, 409);
    assert_eq!(first.await.unwrap().body, "call 1");
    assert!(send(&app, post(KEY, "a")).await.replayed());
    assert_eq!(calls.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn renewal_stops_at_the_lease_ceiling() {
    let layer = IdempotencyLayer::memory()
        .with_lease(Duration::from_secs(3))
        .unwrap()
        .with_lease_ceiling(Duration::from_secs(6))
        .unwrap();
    let (app, calls) = slow_first(&layer, Duration::from_secs(60));
    let first = tokio::spawn(send_owned(app.clone(), post(KEY, "a")));
    tokio::time::sleep(Duration::from_secs(12)).await;
    let second = send(&app, post(KEY, "a")).await;
    assert_eq!((second.status.as_u16(), &second.body[..]), (201, &b"call 2"[..]), "the stuck claim expired");
    assert_eq!(first.await.unwrap().body, "call 1", "the late first answer still reaches its client");
    assert_eq!(calls.get(), 2);
}

// ---- large bodies and full stores ---------------------------------------------------

#[tokio::test]
async fn a_large_body_that_is_ready_at_once_still_streams_and_replays_whole() {
    let layer = IdempotencyLayer::memory();
    let (app, calls) = {
        let (app, calls) = counted(&layer, move |_, _| {
            async {
                // 200 chunks of 1 KiB, never pending: more than is gathered
                // before the head goes out.
                let frames = (0..200u8).map(|i| Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![i; 1024]))));
                Response::new(BodyExt::boxed(StreamBody::new(stream::iter(frames))))
            }
        });
        (app, calls)
    };
    let first = send(&app, post(KEY, "a")).await;
    let replay = send(&app, post(KEY, "a")).await;
    assert_eq!(first.body.len(), 200 * 1024);
    assert_eq!((&replay.body, replay.replayed()), (&first.body, true));
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn a_response_too_big_for_a_full_store_is_never_rerun() {
    let layer = IdempotencyLayer::new(MemoryStore::with_limits(10, 2_000));
    let (app, calls) = counted(&layer, move |_, _| async { respond(201, vec![b'x'; 5_000]) });
    assert_eq!(send(&app, post(KEY, "a")).await.body.len(), 5_000);
    let duplicate = send(&app, post(KEY, "a")).await;
    assert_eq!((duplicate.status.as_u16(), duplicate.problem().as_str()), (410, "response-not-stored"));
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn a_custom_responder_replaces_rejections() {
    use tower_idempotency::{Rejection, RejectionKind};

    let layer = IdempotencyLayer::memory().with_key_required(true).with_responder(|rejection: &Rejection| {
        if rejection.kind() == RejectionKind::MissingKey {
            let mut response = Response::new(Bytes::from_static(b"send a key, please"));
            *response.status_mut() = http::StatusCode::PRECONDITION_REQUIRED;
            return response;
        }
        rejection.default_response()
    });
    let (app, calls) = counting(&layer);
    let custom = send(&app, post(None, "a")).await;
    assert_eq!((custom.status.as_u16(), &custom.body[..]), (428, &b"send a key, please"[..]));
    assert_eq!(send(&app, post(Some(""), "a")).await.problem(), "invalid-key", "other cases keep the default");
    assert_eq!(calls.get(), 0);
}

/// A memory store with slow calls. Its first claim answers only after
/// `first_claim`: it lands after the request that sent it has given up,
/// and, like a command already sent to Redis, even if its future is
/// dropped. Every release takes `release`.
#[derive(Clone, Default)]
struct Slowed {
    inner: MemoryStore,
    first_claim: Duration,
    release: Duration,
    claims: Calls,
    /// Signalled once the slow first claim has landed in the store.
    landed: std::sync::Arc<tokio::sync::Notify>,
}

impl Store for Slowed {
    async fn claim(&self, request: ClaimRequest) -> Result<Claim, StoreError> {
        if self.claims.bump() == 1 && !self.first_claim.is_zero() {
            let (inner, delay, landed) = (self.inner.clone(), self.first_claim, self.landed.clone());
            let sent = tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let claim = inner.claim(request).await;
                landed.notify_one();
                claim
            });
            return sent.await.unwrap_or_else(|_| Err(StoreError::unavailable("claim task failed")));
        }
        self.inner.claim(request).await
    }
    async fn complete(
        &self,
        id: &RecordId,
        owner: OwnerToken,
        record: tower_idempotency::Record,
        retention: Duration,
    ) -> Result<(), StoreError> {
        self.inner.complete(id, owner, record, retention).await
    }
    async fn release(&self, id: &RecordId, owner: OwnerToken) -> Result<(), StoreError> {
        tokio::time::sleep(self.release).await;
        self.inner.release(id, owner).await
    }
    async fn renew(&self, id: &RecordId, owner: OwnerToken, lease: Duration) -> Result<(), StoreError> {
        self.inner.renew(id, owner, lease).await
    }
    async fn lookup(&self, id: &RecordId) -> Result<Option<RecordState>, StoreError> {
        self.inner.lookup(id).await
    }
    async fn wait(&self, id: &RecordId, timeout: Duration) {
        self.inner.wait(id, timeout).await
    }
}

#[tokio::test]
async fn a_claim_that_lands_after_its_request_gave_up_is_given_back() {
    let store = Slowed { first_claim: Duration::from_millis(100), ..Slowed::default() };
    let layer = IdempotencyLayer::new(store.clone())
        .with_store_timeout(Duration::from_millis(20))
        .unwrap()
        .with_in_flight(InFlightPolicy::Wait(Duration::from_secs(10)));
    let (app, calls) = counting(&layer);
    // The claim outlives its request's store timeout: 503, nothing ran.
    assert_eq!(send(&app, post(KEY, "a")).await.status, 503);
    store.landed.notified().await;
    // The retry finds the late claim in flight and waits; the late claim
    // must be given back (not held for its 30 s lease), so the retry runs.
    let retry = send(&app, post(KEY, "a")).await;
    assert_eq!((retry.status.as_u16(), retry.replayed()), (201, false));
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn a_claim_whose_client_left_is_given_back() {
    let store = Slowed { first_claim: Duration::from_millis(100), ..Slowed::default() };
    let layer = IdempotencyLayer::new(store.clone()).with_in_flight(InFlightPolicy::Wait(Duration::from_secs(10)));
    let (app, calls) = counting(&layer);
    let first = tokio::spawn(send_owned(app.clone(), post(KEY, "a")));
    // Hang up while the first claim is on its way.
    while store.claims.get() == 0 {
        tokio::task::yield_now().await;
    }
    first.abort();
    store.landed.notified().await;
    let retry = send(&app, post(KEY, "a")).await;
    assert_eq!((retry.status.as_u16(), retry.replayed()), (201, false));
    assert_eq!(calls.get(), 1);
}

/// A body that sends `before` chunks (pausing after each), then panics.
fn panicking_body(before: usize) -> TestBody {
    let frames = stream::iter(0..=before).then(move |i| async move {
        assert!(i < before, "response body bug");
        tokio::task::yield_now().await;
        Ok::<_, std::io::Error>(Frame::data(Bytes::from("part ")))
    });
    BodyExt::boxed(StreamBody::new(frames))
}

#[tokio::test]
async fn a_body_that_panics_releases_the_key_before_the_client_sees_it_fail() {
    for before in [0, 2] {
        // A slow release: the client must still hear of the failure after it.
        let layer = IdempotencyLayer::new(Slowed { release: Duration::from_millis(100), ..Slowed::default() });
        let (app, calls) = counted(&layer, move |n, _| async move {
            if n == 1 { Response::new(panicking_body(before)) } else { respond(201, "second try") }
        });
        let response = app.clone().oneshot(post(KEY, "a")).await.unwrap();
        if before == 0 {
            assert_eq!(response.status(), 500, "nothing was sent: a 500");
        } else {
            assert!(response.into_body().collect().await.is_err(), "the streamed body breaks");
        }
        let retry = send(&app, post(KEY, "a")).await;
        assert_eq!((retry.status.as_u16(), &retry.body[..]), (201, &b"second try"[..]), "panic after {before} chunks");
        assert_eq!(calls.get(), 2);
    }
}

#[tokio::test]
async fn a_panic_in_user_code_before_the_claim_leaves_nothing_claimed() {
    use futures_util::FutureExt;

    let calls = Calls::default();
    let scope_calls = calls.clone();
    let layer = IdempotencyLayer::memory().with_scope(move |_: &http::request::Parts| {
        assert!(scope_calls.bump() > 1, "scope function bug");
        Some(tower_idempotency::Scope::anonymous())
    });
    let (app, executions) = counting(&layer);
    let crashed = std::panic::AssertUnwindSafe(app.clone().oneshot(post(KEY, "a"))).catch_unwind().await;
    assert!(crashed.is_err(), "the panic reaches the server, as any handler panic would");
    let retry = send(&app, post(KEY, "a")).await;
    assert_eq!((retry.status.as_u16(), retry.replayed()), (201, false), "nothing was left claimed");
    assert_eq!(executions.get(), 1);
}
