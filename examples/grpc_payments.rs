//! A gRPC payment service (tonic) guarded by `IdempotencyLayer`.
//!
//! ```text
//! cargo run --release --example grpc_payments
//! ```
//!
//! `payments.v1.Payments/CreateCharge` (see `examples/proto/payments.proto`)
//! takes the key from `idempotency-key` metadata and the scope from
//! `authorization` metadata. A replay returns the same message, status and
//! trailers, with `idempotent-replayed: true` in the initial metadata.
//! `source: "tok_chargeDeclined"` fails with FAILED_PRECONDITION, which is
//! stored and replayed; an invalid key gets INVALID_ARGUMENT.
//!
//! Flags:
//!   --addr HOST:PORT            listen address (127.0.0.1:50051)
//!   --redis URL                 use Redis (also REDIS_URL); default: in memory
//!   --processor-latency-ms N    simulated card processor time (0)

#[path = "support/grpc.rs"]
mod grpc;
#[path = "support/logs.rs"]
mod logs;

use std::{net::SocketAddr, time::Duration};

use tower_idempotency::{IdempotencyLayer, Store, store::redis::deadpool_redis};

const USAGE: &str = "usage: grpc_payments [--addr HOST:PORT] [--redis URL] [--processor-latency-ms N]";

#[tokio::main]
async fn main() {
    logs::init();
    let mut addr = SocketAddr::from(([127, 0, 0, 1], 50051));
    let mut redis = std::env::var("REDIS_URL").ok().filter(|url| !url.is_empty());
    let mut latency = Duration::ZERO;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next();
        let parsed = match (flag.as_str(), value) {
            ("--addr", Some(value)) => value.parse().map(|a| addr = a).map_err(|e| format!("--addr: {e}")),
            ("--redis", Some(value)) => {
                redis = Some(value);
                Ok(())
            }
            ("--processor-latency-ms", Some(value)) => {
                value.parse().map(|ms| latency = Duration::from_millis(ms)).map_err(|e| format!("{flag}: {e}"))
            }
            _ => Err(format!("unknown flag or missing value: {flag}\n{USAGE}")),
        };
        if let Err(message) = parsed {
            eprintln!("{message}");
            std::process::exit(2);
        }
    }
    let result = match redis {
        Some(url) => match deadpool_redis::Config::from_url(url).create_pool(Some(deadpool_redis::Runtime::Tokio1)) {
            Ok(pool) => serve(addr, IdempotencyLayer::redis(pool), latency, "Redis").await,
            Err(error) => Err(error.into()),
        },
        None => serve(addr, IdempotencyLayer::memory(), latency, "in-memory store").await,
    };
    if let Err(error) = result {
        eprintln!("grpc_payments: {error}");
        std::process::exit(1);
    }
}

async fn serve<St: Store + Clone>(
    addr: SocketAddr,
    layer: IdempotencyLayer<St>,
    latency: Duration,
    store: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let service = grpc::pb::payments_server::PaymentsServer::new(grpc::PaymentsService::new(latency));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("grpc_payments listening on {} ({store})", listener.local_addr()?);
    tonic::transport::Server::builder()
        .layer(grpc::configure(layer))
        .add_service(service)
        .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener), async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
