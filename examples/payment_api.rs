//! A payment API shaped like Stripe's v1 charges, guarded by
//! `IdempotencyLayer`, with a SQLite ledger as the second line of defence.
//!
//! ```text
//! cargo run --release --example payment_api
//! curl -s localhost:3000/v1/charges -u sk_test_1: -H 'Idempotency-Key: order-1' \
//!      -d amount=500 -d currency=usd -d source=tok_visa
//! ```
//!
//! Flags:
//!   --addr HOST:PORT              listen address (127.0.0.1:3000)
//!   --ledger PATH                 the SQLite ledger (./payment_api.sqlite3)
//!   --redis URL                   use Redis (also REDIS_URL)
//!   --redis-cluster URL,URL,...   use a Redis Cluster
//!   --postgres URL                use PostgreSQL for the records and the ledger (also
//!                                 DATABASE_URL; needs `--features postgres`)
//!   --processor-latency-ms N      simulated card processor time (0)
//!   --in-flight conflict|accepted|wait:MS   duplicates while one runs (conflict)
//!   --lease-ms N                  the claim's lease (30000)
//!   --memory-capacity N           records the in-memory store holds (100000)
//!
//! None of `--redis`, `--redis-cluster`, `--postgres`: the in-memory store.
//! `source=tok_chargeDeclined` is declined (402, stored and replayed).
//!
//! With `--postgres` each charge is inserted in its request's transaction,
//! which commits with the idempotency record before the client gets the
//! answer (`--ledger` is not used). `metadata[simulate]` switches:
//!   crash_after_charge   charges, then panics: the transaction rolls back
//!                        (with `--postgres`: nothing is kept, the retry
//!                        charges once; otherwise the ledger kept the charge
//!                        and the retry answers with it)
//!   abort_before_commit  charges, then the process aborts before the commit
//!   abort_after_commit   the process aborts right after the commit, before
//!                        the client gets its answer

#[path = "support/logs.rs"]
mod logs;
#[path = "support/payments.rs"]
mod payments;
#[path = "support/serve.rs"]
mod serve;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use tower_idempotency::{
    IdempotencyLayer, InFlightPolicy, Store,
    store::{
        MemoryStore,
        redis::{RedisStore, deadpool_redis},
    },
};

struct Flags {
    addr: SocketAddr,
    ledger: PathBuf,
    redis: Option<String>,
    redis_cluster: Option<Vec<String>>,
    postgres: Option<String>,
    processor_latency: Duration,
    in_flight: InFlightPolicy,
    lease: Option<Duration>,
    memory_capacity: usize,
}

const USAGE: &str = "usage: payment_api [--addr HOST:PORT] [--ledger PATH] [--redis URL | --redis-cluster URL,URL,... | --postgres URL] \
                     [--processor-latency-ms N] [--in-flight conflict|accepted|wait:MS] [--lease-ms N] \
                     [--memory-capacity N]";

fn parse_flags() -> Result<Flags, String> {
    let mut flags = Flags {
        addr: SocketAddr::from(([127, 0, 0, 1], 3000)),
        ledger: PathBuf::from("payment_api.sqlite3"),
        redis: std::env::var("REDIS_URL").ok().filter(|url| !url.is_empty()),
        redis_cluster: None,
        postgres: std::env::var("DATABASE_URL").ok().filter(|url| !url.is_empty()),
        processor_latency: Duration::ZERO,
        in_flight: InFlightPolicy::Conflict,
        lease: None,
        memory_capacity: 100_000,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"));
        let millis = |text: String| text.parse().map(Duration::from_millis).map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--addr" => flags.addr = value()?.parse().map_err(|e| format!("--addr: {e}"))?,
            "--ledger" => flags.ledger = PathBuf::from(value()?),
            "--redis" => flags.redis = Some(value()?),
            "--redis-cluster" => flags.redis_cluster = Some(value()?.split(',').map(str::to_owned).collect()),
            "--postgres" => flags.postgres = Some(value()?),
            "--processor-latency-ms" => flags.processor_latency = millis(value()?)?,
            "--lease-ms" => flags.lease = Some(millis(value()?)?),
            "--memory-capacity" => {
                flags.memory_capacity = value()?.parse().map_err(|e| format!("--memory-capacity: {e}"))?;
            }
            "--in-flight" => {
                flags.in_flight = match value()?.as_str() {
                    "conflict" => InFlightPolicy::Conflict,
                    "accepted" => InFlightPolicy::Accepted { status_url: Some("/v1/idempotency/{key}".to_owned()) },
                    other => match other.strip_prefix("wait:") {
                        Some(ms) => InFlightPolicy::Wait(millis(ms.to_owned())?),
                        None => return Err(format!("--in-flight {other}: use conflict, accepted or wait:MS")),
                    },
                }
            }
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown flag {other}\n{USAGE}")),
        }
    }
    Ok(flags)
}

#[tokio::main]
async fn main() {
    logs::init();
    let flags = match parse_flags() {
        Ok(flags) => flags,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    if let Err(error) = run(flags).await {
        eprintln!("payment_api: {error}");
        std::process::exit(1);
    }
}

async fn run(flags: Flags) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(url) = &flags.postgres {
        if flags.redis.is_some() || flags.redis_cluster.is_some() {
            return Err(
                "choose one store: --postgres (or DATABASE_URL), --redis (or REDIS_URL), --redis-cluster".into()
            );
        }
        return run_on_postgres(&flags, url).await;
    }
    let payments = payments::Payments::open(&flags.ledger, flags.processor_latency)?;
    let runtime = Some(deadpool_redis::Runtime::Tokio1);
    if let Some(urls) = &flags.redis_cluster {
        let pool = deadpool_redis::cluster::Config::from_urls(urls.clone()).create_pool(runtime)?;
        serve(&flags, IdempotencyLayer::redis_cluster(pool), payments, "Redis Cluster").await
    } else if let Some(url) = &flags.redis {
        let pool = deadpool_redis::Config::from_url(url.as_str()).create_pool(runtime)?;
        serve(&flags, IdempotencyLayer::new(RedisStore::new(pool)), payments, "Redis").await
    } else {
        let store = MemoryStore::with_limits(flags.memory_capacity, 64 << 20);
        serve(&flags, IdempotencyLayer::new(store), payments, "in-memory store").await
    }
}

/// The records and the ledger in PostgreSQL, each charge in its request's
/// transaction.
#[cfg(feature = "postgres")]
async fn run_on_postgres(flags: &Flags, url: &str) -> Result<(), Box<dyn std::error::Error>> {
    use tower_idempotency::store::postgres::{TransactionalStore, sqlx::postgres::PgPoolOptions};

    // One connection per request in flight, and half as many again for waiting duplicates.
    let pool = PgPoolOptions::new()
        .max_connections(64)
        .connect(url)
        .await
        .map_err(|error| format!("PostgreSQL at {url} does not answer: {error}"))?;
    let store = TransactionalStore::new(pool.clone());
    store.migrate().await?;
    let payments = payments::Payments::on_postgres(pool, flags.processor_latency).await?;
    serve(flags, IdempotencyLayer::new(store), payments, "PostgreSQL, transactional").await
}

#[cfg(not(feature = "postgres"))]
async fn run_on_postgres(_: &Flags, _: &str) -> Result<(), Box<dyn std::error::Error>> {
    Err("--postgres needs the postgres feature: cargo run --release --features postgres --example payment_api".into())
}

async fn serve<St: Store + Clone>(
    flags: &Flags,
    layer: IdempotencyLayer<St>,
    payments: std::sync::Arc<payments::Payments>,
    store: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut layer = layer.with_in_flight(flags.in_flight.clone());
    if let Some(lease) = flags.lease {
        layer = layer.with_lease(lease)?;
    }
    // A wrong URL or a store that is down stops the service here, not on
    // every request.
    layer.check().await.map_err(|error| format!("the idempotency store ({store}) does not answer: {error}"))?;
    let router = payments::router(layer, payments);
    let listener = tokio::net::TcpListener::bind(flags.addr).await?;
    let ledger = if flags.postgres.is_some() { "in PostgreSQL".to_owned() } else { flags.ledger.display().to_string() };
    println!("payment_api listening on http://{} ({store}, ledger {ledger})", listener.local_addr()?);
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    serve::serve(listener, router, serve::Limits::default(), shutdown).await;
    Ok(())
}
