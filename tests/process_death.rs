//! An app instance killed with SIGKILL mid-request: the next instance sees
//! the key in flight until the dead one's lease runs out, then runs the
//! request exactly once.
//!
//! The dead instance is this test binary itself, started again as a child
//! process that runs only `child_app_instance`.
#![cfg(feature = "redis")]

mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use axum::{Router, routing::post};
use common::{redis::RedisServer, *};
use tower::ServiceExt;
use tower_idempotency::IdempotencyLayer;

const LEASE: Duration = Duration::from_millis(1500);
const EXECUTIONS: &str = "test:executions";

/// The app every instance runs: counts its executions in Redis, then takes
/// `work` to answer.
fn app_on(redis_url: &str, work: Duration) -> Router {
    let pool = deadpool_pool(redis_url);
    let counter = pool.clone();
    let layer = IdempotencyLayer::redis(pool).with_lease(LEASE).unwrap().with_lease_ceiling(LEASE * 10).unwrap();
    Router::new()
        .route(
            "/charges",
            post(move || {
                let counter = counter.clone();
                async move {
                    let mut connection = counter.get().await.unwrap();
                    let n: u64 = ::redis::cmd("INCR").arg(EXECUTIONS).query_async(&mut connection).await.unwrap();
                    tokio::time::sleep(work).await;
                    (http::StatusCode::CREATED, format!("charged by execution {n}"))
                }
            }),
        )
        .layer(layer)
}

fn deadpool_pool(url: &str) -> tower_idempotency::store::redis::deadpool_redis::Pool {
    use tower_idempotency::store::redis::deadpool_redis;
    deadpool_redis::Config::from_url(url).create_pool(Some(deadpool_redis::Runtime::Tokio1)).unwrap()
}

/// Run by the parent test as a child process; does nothing when run by hand.
#[test]
#[ignore]
fn child_app_instance() {
    let Ok(url) = std::env::var("CHILD_APP_REDIS_URL") else { return };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("LISTENING {}", listener.local_addr().unwrap().port());
        // The handler outlives the test: it is killed long before.
        let app = app_on(&url, Duration::from_secs(60));
        let serve = axum::serve(listener, app);
        let _ = tokio::time::timeout(Duration::from_secs(90), serve).await;
    });
}

/// The child process, killed however the test ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn charge() -> http::Request<axum::body::Body> {
    http::Request::post("/charges")
        .header("idempotency-key", "order-killed")
        .header("authorization", AUTH)
        .body(axum::body::Body::from("a"))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_frees_its_key_after_one_lease_and_it_runs_once_more() {
    let server = RedisServer::start();
    let mut child = Child(
        Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "child_app_instance", "--nocapture", "--test-threads", "1"])
            .env("CHILD_APP_REDIS_URL", server.url())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let port: u16 = loop {
        let line = lines.next().expect("the child exited").unwrap();
        // libtest's own "test child_app_instance ... " shares the line.
        if let Some((_, port)) = line.split_once("LISTENING ") {
            break port.trim().parse().unwrap();
        }
    };

    // The first attempt reaches the doomed instance and starts executing.
    let request = tokio::spawn(async move {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
        tokio::spawn(connection);
        let request = http::Request::post("/charges")
            .header("host", "localhost")
            .header("idempotency-key", "order-killed")
            .header("authorization", AUTH)
            .body(http_body_util::Full::new(bytes::Bytes::from("a")))
            .unwrap();
        sender.send_request(request).await
    });
    let executions = || server.command(&["GET", EXECUTIONS]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !executions().contains("\r\n1\r\n") {
        assert!(Instant::now() < deadline, "the first execution never started");
        tokio::task::yield_now().await;
    }
    child.0.kill().unwrap(); // SIGKILL: no release, no renewal, nothing
    child.0.wait().unwrap();
    assert!(request.await.unwrap().is_err(), "the client lost its connection");
    let killed_at = Instant::now();

    // The retry reaches another instance: in flight until the lease runs out.
    let survivor = app_on(&server.url(), Duration::ZERO);
    let retry = read(survivor.clone().oneshot(charge()).await.unwrap()).await;
    assert_eq!(retry.status, 409, "the dead instance's claim still holds");
    assert!(executions().contains("\r\n1\r\n"));

    // Once the lease is gone, the retry runs, once.
    let answer = loop {
        let answer = read(survivor.clone().oneshot(charge()).await.unwrap()).await;
        if answer.status != 409 {
            break answer;
        }
        assert!(killed_at.elapsed() < LEASE * 4, "the key stayed in flight past its lease");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((answer.status.as_u16(), &answer.body[..]), (201, &b"charged by execution 2"[..]));
    assert!(killed_at.elapsed() <= LEASE + Duration::from_millis(500), "freed within one lease");
    let replay = read(survivor.oneshot(charge()).await.unwrap()).await;
    assert_eq!((&replay.body, replay.replayed()), (&answer.body, true));
    assert!(executions().contains("\r\n2\r\n"), "exactly one more execution");
}
