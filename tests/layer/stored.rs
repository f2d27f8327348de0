//! What is stored.

use super::*;

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
    let to = |path: &str| {
        Request::post(path).header("idempotency-key", "k").header("authorization", AUTH).body(Full::default()).unwrap()
    };
    send(&app, to("/always")).await;
    assert!(send(&app, to("/always")).await.replayed(), "a 503 marked Always is replayed");
    let key2 = |path: &str| {
        Request::post(path).header("idempotency-key", "k2").header("authorization", AUTH).body(Full::default()).unwrap()
    };
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
            .header("authorization", AUTH)
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
    assert!(layer.lookup(&test_scope(), &key).await.unwrap().is_none());
    send(&app, post(KEY, "a")).await;
    match layer.lookup(&test_scope(), &key).await.unwrap() {
        Some(RecordState::Completed(record)) => assert_eq!(record.response().unwrap().status(), 201),
        other => panic!("expected completed, got {other:?}"),
    }
    assert!(layer.lookup(&Scope::new("someone else"), &key).await.unwrap().is_none());
}
