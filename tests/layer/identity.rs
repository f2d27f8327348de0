//! Fingerprint and scope.

use super::*;

#[tokio::test]
async fn same_key_different_payload_is_422() {
    let layer = IdempotencyLayer::memory();
    let (app, calls) = counting(&layer);
    send(&app, post(KEY, "amount=100")).await;
    let other_body = send(&app, post(KEY, "amount=999")).await;
    assert_eq!((other_body.status.as_u16(), other_body.problem().as_str()), (422, "key-reused"));
    let other_path = Request::post("/v1/refunds")
        .header("idempotency-key", "order-1")
        .header("authorization", AUTH)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from("amount=100")))
        .unwrap();
    assert_eq!(send(&app, other_path).await.status, 422);
    let other_type = Request::post("/v1/charges")
        .header("idempotency-key", "order-1")
        .header("authorization", AUTH)
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

#[tokio::test]
async fn without_credentials_the_default_scope_refuses_and_a_shared_scope_is_an_opt_in() {
    let anonymous = || {
        let mut request = post(KEY, "a");
        request.headers_mut().remove(header::AUTHORIZATION);
        request
    };
    let (app, calls) = counting(&IdempotencyLayer::memory());
    let refused = send(&app, anonymous()).await;
    assert_eq!((refused.status.as_u16(), refused.problem().as_str()), (400, "missing-scope"));
    let detail = serde_json::from_slice::<serde_json::Value>(&refused.body).unwrap()["detail"].to_string();
    assert!(detail.contains("Authorization") && detail.contains("with_scope"), "{detail}");
    assert_eq!(calls.get(), 0, "a caller without credentials never reads, nor runs under, a shared scope");

    // A public endpoint opts in to one scope for all its callers.
    let public = IdempotencyLayer::memory().with_scope(|_| Some(Scope::anonymous()));
    let (app, calls) = counting(&public);
    assert_eq!(send(&app, anonymous()).await.status, 201);
    assert!(send(&app, anonymous()).await.replayed());
    assert_eq!(calls.get(), 1);
}
