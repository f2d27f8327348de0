//! Which requests are guarded.

use super::*;

#[tokio::test]
async fn unguarded_methods_and_keyless_requests_pass_through_untouched() {
    let (app, calls) = counting(&IdempotencyLayer::memory());
    for _ in 0..2 {
        let get = Request::get("/v1/charges")
            .header("idempotency-key", "k")
            .header("authorization", AUTH)
            .body(Full::default())
            .unwrap();
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
    let put =
        || Request::put("/x").header("x-request-key", "k").header("authorization", AUTH).body(Full::default()).unwrap();
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
            .header("authorization", AUTH)
            .body(Full::default())
            .unwrap();
        let answer = send(&app, request).await;
        assert_eq!((answer.status.as_u16(), answer.problem()), (400, "invalid-key".to_owned()), "{value:?}");
    }
    let twice = Request::post("/v1/charges")
        .header("idempotency-key", "a")
        .header("authorization", AUTH)
        .header("idempotency-key", "a")
        .header("authorization", AUTH)
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
