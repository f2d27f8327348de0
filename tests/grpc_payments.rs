//! The gRPC example over a real HTTP/2 connection.
#![cfg(feature = "redis")]

#[path = "../examples/support/grpc.rs"]
mod grpc;

use std::{net::SocketAddr, sync::Arc};

use bytes::{BufMut, Bytes, BytesMut};
use grpc::{PaymentsService, pb};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use tonic::{Code, metadata::MetadataValue};
use tower_idempotency::IdempotencyLayer;

async fn start() -> (SocketAddr, Arc<PaymentsService>) {
    let service = PaymentsService::new(std::time::Duration::ZERO);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .layer(grpc::configure(IdempotencyLayer::memory()))
        .add_service(pb::payments_server::PaymentsServer::new(service.clone()))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    tokio::spawn(server);
    (addr, service)
}

async fn client(addr: SocketAddr) -> pb::payments_client::PaymentsClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    pb::payments_client::PaymentsClient::new(channel)
}

fn charge(key: &str, api_key: &str, source: &str) -> tonic::Request<pb::CreateChargeRequest> {
    let mut request =
        tonic::Request::new(pb::CreateChargeRequest { amount: 500, currency: "usd".into(), source: source.into() });
    request.metadata_mut().insert("idempotency-key", MetadataValue::try_from(key).unwrap());
    request.metadata_mut().insert("authorization", MetadataValue::try_from(format!("Bearer {api_key}")).unwrap());
    request
}

#[tokio::test]
async fn replays_the_same_message_with_the_replayed_flag() {
    let (addr, service) = start().await;
    let mut client = client(addr).await;
    let first = client.create_charge(charge("g-1", "sk_a", "tok_visa")).await.unwrap();
    let replay = client.create_charge(charge("g-1", "sk_a", "tok_visa")).await.unwrap();
    assert_eq!(replay.get_ref(), first.get_ref());
    assert!(first.get_ref().id.starts_with("ch_"));
    assert_eq!(replay.metadata().get("idempotent-replayed").unwrap(), "true");
    assert!(first.metadata().get("idempotent-replayed").is_none());
    // Another API key is another scope.
    let other = client.create_charge(charge("g-1", "sk_b", "tok_visa")).await.unwrap();
    assert_ne!(other.get_ref().id, first.get_ref().id);
    assert_eq!(service.executions(), 2);
}

#[tokio::test]
async fn a_declined_card_is_failed_precondition_and_replayed() {
    let (addr, service) = start().await;
    let mut client = client(addr).await;
    let first = client.create_charge(charge("g-2", "sk_a", "tok_chargeDeclined")).await.unwrap_err();
    let replay = client.create_charge(charge("g-2", "sk_a", "tok_chargeDeclined")).await.unwrap_err();
    assert_eq!((first.code(), replay.code()), (Code::FailedPrecondition, Code::FailedPrecondition));
    assert_eq!(replay.message(), first.message());
    assert_eq!(replay.metadata().get("idempotent-replayed").unwrap(), "true");
    assert_eq!(service.executions(), 1);
}

#[tokio::test]
async fn rejections_are_grpc_statuses() {
    let (addr, service) = start().await;
    let mut client = client(addr).await;
    let invalid = client.create_charge(charge("bad key", "sk_a", "tok_visa")).await.unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    let mut keyless = charge("k", "sk_a", "tok_visa");
    keyless.metadata_mut().remove("idempotency-key");
    assert_eq!(client.create_charge(keyless).await.unwrap_err().code(), Code::InvalidArgument);
    client.create_charge(charge("g-3", "sk_a", "tok_visa")).await.unwrap();
    let mut reused = charge("g-3", "sk_a", "tok_visa");
    reused.get_mut().amount = 999;
    assert_eq!(client.create_charge(reused).await.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(service.executions(), 1);
}

/// One raw gRPC call over HTTP/2: status, headers, body bytes, trailers.
async fn raw_call(addr: SocketAddr, key: &str) -> (http::StatusCode, http::HeaderMap, Bytes, Option<http::HeaderMap>) {
    raw_call_to(addr, "/payments.v1.Payments/CreateCharge", key).await
}

async fn raw_call_to(
    addr: SocketAddr,
    path: &str,
    key: &str,
) -> (http::StatusCode, http::HeaderMap, Bytes, Option<http::HeaderMap>) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    let message = pb::CreateChargeRequest { amount: 700, currency: "eur".into(), source: "tok_visa".into() };
    let encoded = message.encode_to_vec();
    let mut frame = BytesMut::new();
    frame.put_u8(0);
    frame.put_u32(encoded.len() as u32);
    frame.put_slice(&encoded);
    let request = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("idempotency-key", key)
        .header("authorization", "Bearer sk_raw")
        .body(Full::new(frame.freeze()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    (parts.status, parts.headers, collected.to_bytes(), trailers)
}

#[tokio::test]
async fn a_replay_has_the_same_bytes_and_trailers() {
    let (addr, service) = start().await;
    let first = raw_call(addr, "raw-1").await;
    let replay = raw_call(addr, "raw-1").await;
    assert_eq!(first.0, replay.0);
    assert_eq!(first.2, replay.2, "the same message bytes");
    assert!(!first.2.is_empty());
    assert_eq!(first.3, replay.3, "the same trailers");
    assert_eq!(first.3.as_ref().unwrap()["grpc-status"], "0");
    assert_eq!(replay.1["idempotent-replayed"], "true");
    assert_eq!(service.executions(), 1);
}

/// A keyed call that no handler runs (tonic answers `UNIMPLEMENTED` itself,
/// inside the layer) leaves no record: UNIMPLEMENTED counts as HTTP 501,
/// which the default storage rule does not keep. The same key then charges
/// once, as if never used.
#[tokio::test]
async fn a_keyed_call_to_an_unknown_method_records_nothing() {
    let (addr, service) = start().await;
    for path in ["/payments.v1.Payments/Refund", "/other.v1.Service/CreateCharge"] {
        let (_, headers, _, trailers) = raw_call_to(addr, path, "stray-1").await;
        let status = headers.get("grpc-status").or(trailers.as_ref().and_then(|t| t.get("grpc-status")));
        assert_eq!(status.unwrap(), "12", "{path}: UNIMPLEMENTED");
    }
    let charged = raw_call(addr, "stray-1").await;
    assert_eq!(charged.3.as_ref().unwrap()["grpc-status"], "0");
    assert!(charged.1.get("idempotent-replayed").is_none());
    assert_eq!(service.executions(), 1);
}
