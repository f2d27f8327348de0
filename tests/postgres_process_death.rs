//! An instance of the payment API on PostgreSQL in transactional mode that
//! dies mid-request: before its commit it leaves nothing and its key is
//! free at once; after its commit the retry gets the replay. The dying
//! instance is this test binary itself, started again as a child process
//! that runs only `child_payment_api`.
#![cfg(feature = "postgres")]

mod common;
#[path = "../examples/support/payments.rs"]
mod payments;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use axum::Router;
use common::{postgres::TestDatabase, *};
use tower::ServiceExt;
use tower_idempotency::{
    IdempotencyLayer,
    store::postgres::{TransactionalStore, sqlx},
};

/// The payment API on the database at `url`, its handler taking `latency`.
async fn api_on(url: &str, latency: Duration) -> (Router, std::sync::Arc<payments::Payments>) {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    TransactionalStore::new(pool.clone()).migrate().await.unwrap();
    let payments = payments::Payments::on_postgres(pool.clone(), latency).await.unwrap();
    // A lease far longer than any test: only a dead session frees a key early.
    let layer = IdempotencyLayer::postgres(pool).with_lease(Duration::from_secs(600)).unwrap();
    let layer = layer.with_lease_ceiling(Duration::from_secs(600)).unwrap();
    (payments::router(layer, payments.clone()), payments)
}

/// Run by the parent test as a child process; does nothing when run by hand.
#[test]
#[ignore]
fn child_payment_api() {
    let Ok(url) = std::env::var("CHILD_PAYMENT_API_DATABASE") else { return };
    let latency = Duration::from_millis(std::env::var("CHILD_LATENCY_MS").unwrap().parse().unwrap());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let (app, _) = api_on(&url, latency).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("LISTENING {}", listener.local_addr().unwrap().port());
        let _ = tokio::time::timeout(Duration::from_secs(90), axum::serve(listener, app)).await;
    });
}

/// The child process, killed however the test ends.
struct Child {
    process: std::process::Child,
    port: u16,
}

impl Child {
    fn start(database: &TestDatabase, latency: Duration) -> Self {
        let mut process = Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "child_payment_api", "--nocapture", "--test-threads", "1"])
            .env("CHILD_PAYMENT_API_DATABASE", database.url())
            .env("CHILD_LATENCY_MS", latency.as_millis().to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(process.stdout.take().unwrap()).lines();
        let port = loop {
            let line = lines.next().expect("the child exited").unwrap();
            // libtest's own "test child_payment_api ... " shares the line.
            if let Some((_, port)) = line.split_once("LISTENING ") {
                break port.trim().parse().unwrap();
            }
        };
        Self { process, port }
    }

    /// Sends `charge(simulate)` over HTTP; `None` when the connection died.
    async fn send(&self, simulate: Option<&str>) -> Option<http::StatusCode> {
        send_to(self.port, simulate).await
    }

    /// Waits for the child to end by itself; whether it aborted.
    fn aborted(&mut self) -> bool {
        use std::os::unix::process::ExitStatusExt;
        self.process.wait().unwrap().signal() == Some(6)
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

async fn send_to(port: u16, simulate: Option<&str>) -> Option<http::StatusCode> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    let request = charge(simulate).map(http_body_util::Full::new);
    sender.send_request(request).await.ok().map(|response| response.status())
}

/// The charge every test sends, with the key `order-1`.
fn charge(simulate: Option<&str>) -> http::Request<bytes::Bytes> {
    let mut body = String::from("amount=500&currency=usd&source=tok_visa");
    if let Some(switch) = simulate {
        body.push_str(&format!("&metadata[simulate]={switch}"));
    }
    http::Request::post("/v1/charges")
        .header("host", "localhost")
        .header("idempotency-key", "order-1")
        .header("authorization", AUTH)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(bytes::Bytes::from(body))
        .unwrap()
}

/// Sends `charge(simulate)` to an instance in this process.
async fn retry(app: &Router, simulate: Option<&str>) -> Answer {
    let request = charge(simulate).map(axum::body::Body::from);
    read(app.clone().oneshot(request).await.unwrap()).await
}

async fn charges(database: &TestDatabase) -> i64 {
    sqlx::Row::get(&sqlx::raw_sql("SELECT count(*) FROM charges").fetch_one(&database.pool).await.unwrap(), 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_before_the_commit_leaves_nothing_and_the_retry_charges_once() {
    let database = TestDatabase::create().await;
    let mut doomed = Child::start(&database, Duration::ZERO);
    assert_eq!(doomed.send(Some("abort_before_commit")).await, None, "the client got an answer");
    assert!(doomed.aborted());
    assert_eq!(charges(&database).await, 0, "the aborted charge committed");
    let (survivor, payments) = api_on(&database.url(), Duration::ZERO).await;
    let answer = retry(&survivor, Some("abort_before_commit")).await;
    assert_eq!((answer.status.as_u16(), answer.replayed()), (200, false));
    assert_eq!((payments.executions(), charges(&database).await), (1, 1));
    assert!(retry(&survivor, Some("abort_before_commit")).await.replayed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_after_the_commit_leaves_the_charge_and_the_retry_gets_the_replay() {
    let database = TestDatabase::create().await;
    let mut doomed = Child::start(&database, Duration::ZERO);
    assert_eq!(doomed.send(Some("abort_after_commit")).await, None, "the client got an answer");
    assert!(doomed.aborted());
    assert_eq!(charges(&database).await, 1);
    let (survivor, payments) = api_on(&database.url(), Duration::ZERO).await;
    let answer = retry(&survivor, Some("abort_after_commit")).await;
    assert_eq!((answer.status.as_u16(), answer.replayed()), (200, true));
    assert_eq!((payments.executions(), charges(&database).await), (0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_frees_its_key_at_once_and_the_retry_runs_once() {
    let database = TestDatabase::create().await;
    // The doomed instance's handler takes a minute: it is killed long before.
    let mut doomed = Child::start(&database, Duration::from_secs(60));
    let port = doomed.port;
    let first = tokio::spawn(send_to(port, None));
    // A claim holds its record's lock in its transaction, and writes no row.
    let in_flight = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
                     AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";
    let deadline = Instant::now() + Duration::from_secs(10);
    while sqlx::Row::get::<i64, _>(&sqlx::raw_sql(in_flight).fetch_one(&database.pool).await.unwrap(), 0) == 0 {
        assert!(Instant::now() < deadline, "the first execution never claimed its key");
        tokio::task::yield_now().await;
    }
    doomed.process.kill().unwrap(); // SIGKILL: no rollback, no release, nothing
    doomed.process.wait().unwrap();
    assert_eq!(first.await.unwrap(), None, "the client lost its connection");
    let killed_at = Instant::now();
    // PostgreSQL notices the dead session when its socket closes; the
    // retry that follows runs, long before the ten-minute lease.
    let (survivor, payments) = api_on(&database.url(), Duration::ZERO).await;
    let answer = loop {
        let answer = retry(&survivor, None).await;
        if answer.status != 409 {
            break answer;
        }
        assert!(killed_at.elapsed() < Duration::from_secs(5), "the dead instance's key stayed in flight");
        tokio::task::yield_now().await;
    };
    assert_eq!((answer.status.as_u16(), answer.replayed()), (200, false));
    assert_eq!((payments.executions(), charges(&database).await), (1, 1));
}
