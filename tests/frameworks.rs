//! The layer in the frameworks it is made for: axum's `Router::layer` and
//! `route_layer`, tonic's `Server::builder().layer(..)`, and a bare hyper 1
//! server, each over a real or in-process connection.

mod common;

use std::net::SocketAddr;

use axum::{Router, body::Body, routing::post};
use bytes::Bytes;
use common::{AUTH, Calls, read};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tower::{ServiceBuilder, ServiceExt};
use tower_idempotency::{IdempotencyLayer, RequestBody};

fn charge(key: &str, body: &'static str) -> Request<Body> {
    Request::post("/charges")
        .header("idempotency-key", key)
        .header("authorization", AUTH)
        .body(Body::from(body))
        .unwrap()
}

fn counted_router(calls: &Calls) -> Router {
    let calls = calls.clone();
    Router::new().route(
        "/charges",
        post(move |body: String| {
            let n = calls.bump();
            async move { (StatusCode::CREATED, format!("charge {n} for {body}")) }
        }),
    )
}

#[tokio::test]
async fn axum_router_layer() {
    let calls = Calls::default();
    let app = counted_router(&calls).layer(IdempotencyLayer::memory());
    let first = read(app.clone().oneshot(charge("k1", "amount=5")).await.unwrap()).await;
    let second = read(app.clone().oneshot(charge("k1", "amount=5")).await.unwrap()).await;
    assert_eq!((first.status, &first.body[..]), (StatusCode::CREATED, &b"charge 1 for amount=5"[..]));
    assert_eq!((second.status, &second.body, second.replayed()), (first.status, &first.body, true));
    let mismatch = read(app.oneshot(charge("k1", "amount=6")).await.unwrap()).await;
    assert_eq!(mismatch.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn axum_route_layer_guards_matched_routes_only() {
    let calls = Calls::default();
    let app = counted_router(&calls).route_layer(IdempotencyLayer::memory().with_key_required(true));
    let keyless = Request::post("/charges").body(Body::from("x")).unwrap();
    assert_eq!(app.clone().oneshot(keyless).await.unwrap().status(), StatusCode::BAD_REQUEST);
    let unrouted = Request::post("/nowhere").body(Body::empty()).unwrap();
    assert_eq!(app.clone().oneshot(unrouted).await.unwrap().status(), StatusCode::NOT_FOUND);
    app.clone().oneshot(charge("k", "x")).await.unwrap();
    let replay = read(app.oneshot(charge("k", "x")).await.unwrap()).await;
    assert!(replay.replayed());
    assert_eq!(calls.get(), 1);
}

#[cfg(feature = "axum")]
#[tokio::test]
async fn axum_extractor_gives_the_handler_its_context() {
    use tower_idempotency::IdempotencyContext;

    let app = Router::new()
        .route(
            "/charges",
            post(|context: IdempotencyContext| async move {
                format!("{} {}", context.key().as_str(), context.fencing_token().get())
            }),
        )
        .route("/optional", post(|context: Option<IdempotencyContext>| async move { format!("{}", context.is_some()) }))
        .layer(IdempotencyLayer::memory());
    let answer = read(app.clone().oneshot(charge("order-7", "")).await.unwrap()).await;
    assert_eq!(answer.body, "order-7 1");
    let keyless = Request::post("/charges").body(Body::empty()).unwrap();
    let refused = read(app.clone().oneshot(keyless).await.unwrap()).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    let problem: serde_json::Value = serde_json::from_slice(&refused.body).unwrap();
    assert_eq!(problem["type"], "urn:tower-idempotency:problem:missing-key");
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("IdempotencyContext"), "the refusal says it comes from the extractor: {detail}");
    let optional = Request::post("/optional").body(Body::empty()).unwrap();
    assert_eq!(read(app.oneshot(optional).await.unwrap()).await.body, "false");
}

async fn local_listener() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

#[tokio::test]
async fn tonic_server_builder_layer() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let calls = Calls::default();
    let counter = calls.clone();
    let layer = ServiceBuilder::new()
        .layer(IdempotencyLayer::memory())
        .map_request(move |request: Request<RequestBody<tonic::body::Body>>| {
            counter.bump();
            request
        })
        .into_inner();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let (listener, addr) = local_listener().await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder().layer(layer).add_service(health).serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            async {
                let _ = stopped.await;
            },
        ),
    );

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut client = HealthClient::new(channel);
    let check = |key: &str, service: &str| {
        let mut request = tonic::Request::new(HealthCheckRequest { service: service.into() });
        request.metadata_mut().insert("idempotency-key", key.parse().unwrap());
        request.metadata_mut().insert("authorization", AUTH.parse().unwrap());
        request
    };
    let first = client.check(check("probe-1", "")).await.unwrap();
    let second = client.check(check("probe-1", "")).await.unwrap();
    assert_eq!(second.get_ref(), first.get_ref(), "the same message");
    assert_eq!(second.metadata().get("idempotent-replayed").unwrap(), "true");
    assert!(first.metadata().get("idempotent-replayed").is_none());
    assert_eq!(calls.get(), 1);

    let reused = client.check(check("probe-1", "other")).await.unwrap_err();
    assert_eq!(reused.code(), tonic::Code::InvalidArgument);
    let invalid = client.check(check("bad key", "")).await.unwrap_err();
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);
    assert_eq!(calls.get(), 1);

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn bare_hyper_server() {
    use hyper::body::Incoming;

    let calls = Calls::default();
    let counter = calls.clone();
    let service = ServiceBuilder::new().layer(IdempotencyLayer::memory()).service(tower::service_fn(
        move |request: Request<RequestBody<Incoming>>| {
            let n = counter.bump();
            async move {
                let body = request.into_body().collect().await?.to_bytes();
                let reply = format!("charge {n}: {}", String::from_utf8_lossy(&body));
                Ok::<_, tower_idempotency::BoxError>(http::Response::new(Full::new(Bytes::from(reply))))
            }
        },
    ));
    let (listener, addr) = local_listener().await;
    let server = tokio::spawn(async move {
        // Two connections, then stop.
        for _ in 0..2 {
            let (stream, _) = listener.accept().await.unwrap();
            let service = hyper_util::service::TowerToHyperService::new(service.clone());
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service));
        }
    });

    let mut answers = Vec::new();
    for _ in 0..2 {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(connection);
        let request = Request::post("/charges")
            .header("host", "localhost")
            .header("idempotency-key", "hyper-1")
            .header("authorization", AUTH)
            .body(Full::new(Bytes::from("amount=1")))
            .unwrap();
        answers.push(read(sender.send_request(request).await.unwrap()).await);
    }
    server.await.unwrap();
    assert_eq!(answers[0].body, "charge 1: amount=1");
    assert_eq!((&answers[1].body, answers[1].replayed()), (&answers[0].body, true));
    assert_eq!(calls.get(), 1);
}
