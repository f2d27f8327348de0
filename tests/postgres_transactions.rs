//! The PostgreSQL store in transactional mode: the handler's writes and the
//! record commit together, or not at all. Each test in a database of its
//! own on the PostgreSQL at 127.0.0.1:5432.
#![cfg(feature = "postgres")]

mod common;

use std::time::Duration;

use common::{postgres::TestDatabase, *};
use http::Request;
use tower::ServiceExt;
use tower_idempotency::{
    IdempotencyLayer, InFlightPolicy,
    store::{
        Claim, ClaimRequest, Store,
        postgres::{RequestTransaction, TransactionalStore, sqlx},
    },
};

/// What the test handler does after it wrote its charge, by the request's
/// path.
const PATHS: &str = "/charge: 201 | /fail: 500 | /panic: panics | /hold: waits at the gate, then 201 | \
                     /large: 201 with a 4 KiB body | /aborted: its statement fails, then 201 anyway | \
                     /broken: 201 whose body fails | /unavailable-grpc: gRPC UNAVAILABLE in trailers";

/// A transactional layer on a fresh database with a `charges` table.
async fn setup() -> (TestDatabase, IdempotencyLayer<TransactionalStore>) {
    let database = TestDatabase::create().await;
    let store = TransactionalStore::new(database.pool.clone());
    store.migrate().await.unwrap();
    sqlx::raw_sql("CREATE TABLE charges (n BIGINT NOT NULL, backend INT NOT NULL)")
        .execute(&database.pool)
        .await
        .unwrap();
    (database, IdempotencyLayer::new(store))
}

/// As `setup`, on a pool of its own where `waiting` duplicates may wait at
/// once: each holds a connection while it does.
async fn setup_for_waiters(waiting: u32) -> (TestDatabase, IdempotencyLayer<TransactionalStore>) {
    let (database, _) = setup().await;
    let pool =
        sqlx::postgres::PgPoolOptions::new().max_connections(waiting + 2).connect(&database.url()).await.unwrap();
    let store = TransactionalStore::new(pool).with_max_waiting(waiting as usize);
    (database, IdempotencyLayer::new(store))
}

/// The handler: inserts a charge in the request's transaction, then acts
/// as `PATHS` says. The gate also learns the backend of a held request.
fn charging(
    layer: &IdempotencyLayer<TransactionalStore>,
) -> (App, Gate, Calls, tokio::sync::mpsc::UnboundedReceiver<i32>) {
    let gate = Gate::default();
    let (backends, held_backends) = tokio::sync::mpsc::unbounded_channel();
    let held = gate.clone();
    let (app, calls) = counted(layer, move |n, request: HandlerRequest| {
        let (held, backends) = (held.clone(), backends.clone());
        async move {
            let transaction = request.extensions().get::<RequestTransaction>().expect("a request transaction").clone();
            let path = request.uri().path().to_owned();
            let backend: i32 = {
                let mut connection = transaction.lock().await.unwrap();
                sqlx::query_scalar("INSERT INTO charges (n, backend) VALUES ($1, pg_backend_pid()) RETURNING backend")
                    .persistent(false)
                    .bind(n as i64)
                    .fetch_one(&mut *connection)
                    .await
                    .unwrap()
            };
            match path.as_str() {
                "/fail" => respond(500, "processor down"),
                "/panic" => panic!("crash after charging"),
                "/hold" => {
                    let _ = backends.send(backend);
                    held.pass().await;
                    respond(201, format!("charge {n}"))
                }
                "/large" => respond(201, "x".repeat(4096)),
                "/broken" => {
                    let frames = futures_util::stream::iter([
                        Ok(http_body::Frame::data(bytes::Bytes::from_static(b"partial"))),
                        Err(std::io::Error::other("the body broke")),
                    ]);
                    let mut response = streamed(frames);
                    *response.status_mut() = http::StatusCode::CREATED;
                    response
                }
                "/unavailable-grpc" => {
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", "14".parse().unwrap());
                    let frames = futures_util::stream::iter([
                        Ok::<_, std::io::Error>(http_body::Frame::data(bytes::Bytes::from_static(b"\0\0\0\0\0"))),
                        Ok(http_body::Frame::trailers(trailers)),
                    ]);
                    let mut response = streamed(frames);
                    response.headers_mut().insert("content-type", "application/grpc".parse().unwrap());
                    response
                }
                "/aborted" => {
                    let mut connection = transaction.lock().await.unwrap();
                    let failed =
                        sqlx::raw_sql("DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = 'serialization_failure'; END $$")
                            .execute(&mut *connection)
                            .await;
                    assert!(failed.is_err());
                    respond(201, format!("charge {n}"))
                }
                "/charge" => respond(201, format!("charge {n}")),
                other => panic!("{other}: the test handler knows {PATHS}"),
            }
        }
    });
    (app, gate, calls, held_backends)
}

/// A 200 whose body streams `frames`.
fn streamed(
    frames: impl futures_util::Stream<Item = Result<http_body::Frame<bytes::Bytes>, std::io::Error>> + Send + Sync + 'static,
) -> http::Response<TestBody> {
    http::Response::new(http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(frames)))
}

fn request(path: &str, key: &str, body: &'static str) -> Request<http_body_util::Full<bytes::Bytes>> {
    let mut request = post(Some(key), body);
    *request.uri_mut() = path.parse().unwrap();
    request
}

/// Ends the session of `backend`, and returns once it is gone.
async fn terminate(database: &TestDatabase, backend: i32) {
    // A simple query: behind PgBouncer, one outside a transaction must be one exchange.
    let terminate = format!("SELECT pg_terminate_backend({backend}, 10000)");
    let row = sqlx::raw_sql(sqlx::AssertSqlSafe(terminate)).fetch_one(&database.pool).await.unwrap();
    let terminated: bool = sqlx::Row::get(&row, 0);
    assert!(terminated, "backend {backend} still runs");
}

async fn charges(database: &TestDatabase) -> i64 {
    // A simple query: behind PgBouncer, one outside a transaction must be one exchange.
    sqlx::Row::get(&sqlx::raw_sql("SELECT count(*) FROM charges").fetch_one(&database.pool).await.unwrap(), 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charge_and_the_record_commit_together_and_replay() {
    let (database, layer) = setup().await;
    let (app, _, calls, _) = charging(&layer);
    let first = send(&app, request("/charge", "k1", "amount=100")).await;
    assert_eq!(first.status, 201);
    assert_eq!(first.body, "charge 1");
    let again = send(&app, request("/charge", "k1", "amount=100")).await;
    assert!(again.replayed(), "{} {:?}", again.status, again.body);
    assert_eq!((again.status, again.body), (first.status, first.body));
    assert_eq!(send(&app, request("/charge", "k1", "amount=999")).await.status, 422);
    assert_eq!(calls.get(), 1);
    assert_eq!(charges(&database).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_not_stored_rolls_the_charge_back_and_the_retry_runs() {
    let (database, layer) = setup().await;
    let (app, _, calls, _) = charging(&layer);
    assert_eq!(send(&app, request("/fail", "k1", "amount=100")).await.status, 500);
    assert_eq!(charges(&database).await, 0, "the charge of a 500 committed");
    let retry = send(&app, request("/charge", "k1", "amount=100")).await;
    assert_eq!((retry.status, retry.replayed()), (http::StatusCode::CREATED, false));
    assert_eq!(calls.get(), 2);
    assert_eq!(charges(&database).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_rolls_the_charge_back_and_the_retry_runs() {
    let (database, layer) = setup().await;
    let (app, _, calls, _) = charging(&layer);
    assert_eq!(send(&app, request("/panic", "k1", "amount=100")).await.status, 500);
    assert_eq!(charges(&database).await, 0, "the charge of a panicked handler committed");
    assert_eq!(send(&app, request("/charge", "k1", "amount=100")).await.status, 201);
    assert_eq!(calls.get(), 2);
    assert_eq!(charges(&database).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_cap_commits_and_never_runs_again() {
    let (database, layer) = setup().await;
    let layer = layer.with_response_limit(1024);
    let (app, _, calls, _) = charging(&layer);
    let first = send(&app, request("/large", "k1", "amount=100")).await;
    assert_eq!((first.status, first.body.len()), (http::StatusCode::CREATED, 4096));
    assert_eq!(charges(&database).await, 1);
    let again = send(&app, request("/large", "k1", "amount=100")).await;
    assert_eq!(again.status, 410);
    assert_eq!(calls.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_that_cannot_commit_answers_503_keeps_nothing_and_the_retry_runs() {
    let (database, layer) = setup().await;
    let (app, _, calls, _) = charging(&layer);
    // The handler's statement failed (a serialization failure), but it
    // answered 201 anyway: that answer was never true.
    let answer = send(&app, request("/aborted", "k1", "amount=100")).await;
    assert_eq!(answer.status, 503);
    assert_eq!(answer.problem(), "not-committed");
    assert!(answer.headers.contains_key("retry-after"));
    assert_eq!(charges(&database).await, 0);
    assert_eq!(send(&app, request("/charge", "k1", "amount=100")).await.status, 201);
    assert_eq!(calls.get(), 2);
    assert_eq!(charges(&database).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_of_a_running_request_see_it_in_flight_with_its_fingerprint() {
    let (database, layer) = setup().await;
    let (app, gate, calls, _) = charging(&layer);
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request("/hold", "k1", "")).await }
    });
    gate.entered(1).await;
    assert_eq!(send(&app, request("/hold", "k1", "")).await.status, 409);
    assert_eq!(send(&app, request("/hold", "k1", "other body")).await.status, 422);
    gate.open(1);
    assert_eq!(first.await.unwrap().status, 201);
    assert!(send(&app, request("/hold", "k1", "")).await.replayed());
    assert_eq!(calls.get(), 1);
    assert_eq!(charges(&database).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_duplicates_run_once() {
    let (database, layer) = setup_for_waiters(64).await;
    let layer = layer.with_in_flight(InFlightPolicy::Wait(Duration::from_secs(20)));
    let (app, _, calls, _) = charging(&layer);
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(64));
    let duplicates: Vec<_> = (0..64)
        .map(|_| {
            let (app, start) = (app.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                send(&app, request("/charge", "k1", "amount=100")).await
            })
        })
        .collect();
    let mut bodies = std::collections::HashSet::new();
    for duplicate in duplicates {
        let answer = duplicate.await.unwrap();
        assert_eq!(answer.status, 201, "{:?}", answer.body);
        bodies.insert(answer.body);
    }
    assert_eq!(bodies.len(), 1);
    assert_eq!(calls.get(), 1);
    assert_eq!(charges(&database).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_session_keeps_nothing_and_frees_its_key_at_once() {
    let (database, layer) = setup().await;
    // A lease far longer than the test: only the session's end frees the key.
    let layer =
        layer.with_lease(Duration::from_secs(600)).unwrap().with_lease_ceiling(Duration::from_secs(600)).unwrap();
    let (app, gate, calls, mut backends) = charging(&layer);
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request("/hold", "k1", "")).await }
    });
    let backend = backends.recv().await.unwrap();
    terminate(&database, backend).await;
    // The retry that follows at once runs, however long the lease.
    gate.open(2);
    let retry = send(&app, request("/hold", "k1", "")).await;
    assert_eq!((retry.status, retry.replayed()), (http::StatusCode::CREATED, false));
    let first = first.await.unwrap();
    assert_eq!(first.status, 503, "the terminated request: {:?}", first.body);
    assert_eq!(first.problem(), "not-committed");
    assert!(send(&app, request("/hold", "k1", "")).await.replayed());
    assert_eq!(calls.get(), 2);
    assert_eq!(charges(&database).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_owners_commit_fails_and_its_writes_roll_back() {
    let database = TestDatabase::create().await;
    let store = TransactionalStore::new(database.pool.clone());
    store.migrate().await.unwrap();
    sqlx::raw_sql("CREATE TABLE charges (n BIGINT NOT NULL)").execute(&database.pool).await.unwrap();
    let id = tower_idempotency::RecordId::from_bytes([7; 32]);
    let fingerprint = tower_idempotency::Fingerprint::from_bytes([1; 32]);
    let request = ClaimRequest::new(id, fingerprint, Duration::from_secs(600));
    let Claim::Acquired(stale) = store.claim(request).await.unwrap() else { panic!("not acquired") };
    let mut extensions = http::Extensions::new();
    store.attach(&stale, &mut extensions);
    let transaction = extensions.get::<RequestTransaction>().unwrap().clone();
    let backend: i32 = {
        let mut connection = transaction.lock().await.unwrap();
        sqlx::query("INSERT INTO charges (n) VALUES (1)").persistent(false).execute(&mut *connection).await.unwrap();
        sqlx::query_scalar("SELECT pg_backend_pid()").persistent(false).fetch_one(&mut *connection).await.unwrap()
    };
    // Its session ends (an operator, idle_in_transaction_session_timeout):
    // another request takes the key over at once.
    terminate(&database, backend).await;
    let Claim::Acquired(fresh) = store.claim(request).await.unwrap() else { panic!("not taken over") };
    assert!(fresh.fencing_token() > stale.fencing_token());
    let record = tower_idempotency::Record::not_stored(fingerprint, tower_idempotency::NotStored::TooLarge);
    let committed = store.complete(&id, stale.owner(), record.clone(), Duration::from_secs(60)).await;
    assert!(committed.is_err(), "the stale owner committed: {committed:?}");
    assert_eq!(charges(&database).await, 0, "the stale owner's write committed");
    store.complete(&id, fresh.owner(), record, Duration::from_secs(60)).await.unwrap();
    assert!(matches!(store.claim(request).await.unwrap(), Claim::Completed(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadlock_between_two_requests_is_a_retryable_answer() {
    let (database, layer) = setup().await;
    sqlx::raw_sql(
        "CREATE TABLE accounts (id INT PRIMARY KEY, balance BIGINT); INSERT INTO accounts VALUES (1, 0), (2, 0)",
    )
    .execute(&database.pool)
    .await
    .unwrap();
    // Each request moves money between the two accounts, in its own order:
    // PostgreSQL breaks the deadlock by failing one of them.
    let both_locked_one = std::sync::Arc::new(tokio::sync::Barrier::new(2));
    let calls = Calls::default();
    let (counter, barrier) = (calls.clone(), both_locked_one.clone());
    let app = app(&layer, move |request: HandlerRequest| {
        let (barrier, _) = (barrier.clone(), counter.bump());
        async move {
            let transaction = request.extensions().get::<RequestTransaction>().unwrap().clone();
            let order: [i32; 2] = if request.uri().path() == "/a" { [1, 2] } else { [2, 1] };
            let mut connection = transaction.lock().await.unwrap();
            let update = "UPDATE accounts SET balance = balance + 1 WHERE id = $1";
            sqlx::query(update).persistent(false).bind(order[0]).execute(&mut *connection).await.unwrap();
            barrier.wait().await;
            match sqlx::query(update).persistent(false).bind(order[1]).execute(&mut *connection).await {
                Ok(_) => respond(201, "moved"),
                Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("40P01") => {
                    respond(503, "deadlock: retry")
                }
                Err(error) => panic!("{error}"),
            }
        }
    });
    let a = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request("/a", "ka", "")).await }
    });
    let b = send(&app, request("/b", "kb", "")).await;
    let a = a.await.unwrap();
    let mut statuses = [a.status.as_u16(), b.status.as_u16()];
    statuses.sort();
    assert_eq!(statuses, [201, 503]);
    // The request that lost the deadlock kept nothing and runs on retry.
    let (lost, path) = if a.status == 503 { ("ka", "/a") } else { ("kb", "/b") };
    let retry = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request(path, lost, "")).await }
    });
    both_locked_one.wait().await;
    assert_eq!(retry.await.unwrap().status, 201);
    let total = sqlx::raw_sql("SELECT sum(balance)::BIGINT FROM accounts").fetch_one(&database.pool).await.unwrap();
    let total: i64 = sqlx::Row::get(&total, 0);
    assert_eq!(total, 4, "two requests, two updates each");
    assert_eq!(calls.get(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_session_keeps_its_key_past_its_lease_and_a_dead_one_frees_it() {
    let database = TestDatabase::create().await;
    let store = TransactionalStore::new(database.pool.clone());
    store.migrate().await.unwrap();
    let id = tower_idempotency::RecordId::from_bytes([9; 32]);
    let fingerprint = tower_idempotency::Fingerprint::from_bytes([1; 32]);
    let request = ClaimRequest::new(id, fingerprint, Duration::from_millis(200));
    let Claim::Acquired(first) = store.claim(request).await.unwrap() else { panic!("not acquired") };
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(matches!(store.claim(request).await.unwrap(), Claim::InFlight { .. }), "a live owner lost its key");
    // Its session ends: the key is free at once.
    let mut extensions = http::Extensions::new();
    store.attach(&first, &mut extensions);
    let transaction = extensions.get::<RequestTransaction>().unwrap().clone();
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .persistent(false)
        .fetch_one(&mut *transaction.lock().await.unwrap())
        .await
        .unwrap();
    terminate(&database, backend).await;
    assert!(matches!(store.claim(request).await.unwrap(), Claim::Acquired(_)), "a dead owner kept its key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_sent_at_once_get_the_answer_or_409_never_503() {
    let (database, layer) = setup().await;
    let (app, _, calls, _) = charging(&layer);
    const KEYS: usize = 100;
    for key in 0..KEYS {
        let key: &'static str = Box::leak(format!("k{key}").into_boxed_str());
        let duplicates: Vec<_> = (0..16)
            .map(|_| {
                let app = app.clone();
                tokio::spawn(async move { send(&app, request("/charge", key, "amount=100")).await })
            })
            .collect();
        for duplicate in duplicates {
            let answer = duplicate.await.unwrap();
            assert!(matches!(answer.status.as_u16(), 201 | 409), "{key}: {} {:?}", answer.status, answer.body);
        }
    }
    assert_eq!(calls.get(), KEYS);
    assert_eq!(charges(&database).await, KEYS as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_outlives_its_lease_ceiling_still_commits_once() {
    let (database, layer) = setup().await;
    let lease = Duration::from_millis(150);
    let layer = layer.with_lease(lease).unwrap().with_lease_ceiling(lease * 2).unwrap();
    let (app, gate, calls, _) = charging(&layer);
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request("/hold", "k1", "")).await }
    });
    gate.entered(1).await;
    // Time passing is the point here: past the lease and its ceiling.
    tokio::time::sleep(lease * 4).await;
    assert_eq!(send(&app, request("/hold", "k1", "")).await.status, 409, "a live owner lost its key");
    gate.open(1);
    assert_eq!(first.await.unwrap().status, 201);
    assert!(send(&app, request("/hold", "k1", "")).await.replayed());
    assert_eq!(calls.get(), 1);
    assert_eq!(charges(&database).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_fails_commits_its_writes_and_never_runs_again() {
    let (database, layer) = setup().await;
    let (app, _, calls, _) = charging(&layer);
    let first = app.clone().oneshot(request("/broken", "k1", "")).await.unwrap();
    assert_eq!(first.status(), 201);
    assert!(
        http_body_util::BodyExt::collect(first.into_body()).await.is_err(),
        "the body's failure reached the client"
    );
    assert_eq!(charges(&database).await, 1);
    assert_eq!(send(&app, request("/broken", "k1", "")).await.status, 410);
    assert_eq!(calls.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_status_not_stored_in_trailers_rolls_back() {
    let (database, layer) = setup().await;
    let (app, _, calls, _) = charging(&layer);
    let first = send(&app, request("/unavailable-grpc", "k1", "")).await;
    assert_eq!(first.trailers.as_ref().and_then(|t| t.get("grpc-status")).unwrap(), "14");
    assert_eq!(charges(&database).await, 0, "the charge of an UNAVAILABLE answer committed");
    send(&app, request("/unavailable-grpc", "k1", "")).await;
    assert_eq!(calls.get(), 2);
}

/// A layer on a fresh database whose default transaction isolation is
/// `isolation`.
async fn setup_with_isolation(isolation: &str) -> (TestDatabase, IdempotencyLayer<TransactionalStore>) {
    let database = TestDatabase::create_with(&[("default_transaction_isolation", isolation)]).await;
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(20).connect(&database.url()).await.unwrap();
    let store = TransactionalStore::new(pool.clone()).with_max_waiting(16);
    store.migrate().await.unwrap();
    sqlx::raw_sql("CREATE TABLE charges (n BIGINT NOT NULL, backend INT NOT NULL)").execute(&pool).await.unwrap();
    let shown = sqlx::raw_sql("SHOW transaction_isolation").fetch_one(&pool).await.unwrap();
    let isolation_seen: String = sqlx::Row::get(&shown, 0);
    assert_eq!(isolation_seen, isolation);
    (database, IdempotencyLayer::new(store))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_released_the_instant_the_first_commits_run_once() {
    let (database, layer) = setup_for_waiters(16).await;
    let layer = layer.with_in_flight(InFlightPolicy::Wait(Duration::from_secs(20)));
    let (app, gate, calls, _) = charging(&layer);
    for round in 0..5 {
        let key: &'static str = Box::leak(format!("k{round}").into_boxed_str());
        let first = tokio::spawn({
            let app = app.clone();
            async move { send(&app, request("/hold", key, "")).await }
        });
        gate.entered(1).await;
        // Duplicates queue on the first request's lock, then all go the
        // instant it commits.
        let duplicates: Vec<_> = (0..16)
            .map(|_| {
                let app = app.clone();
                tokio::spawn(async move { send(&app, request("/hold", key, "")).await })
            })
            .collect();
        tokio::task::yield_now().await;
        gate.open(1);
        let first = first.await.unwrap();
        assert_eq!(first.status, 201);
        for duplicate in duplicates {
            let answer = duplicate.await.unwrap();
            assert_eq!((answer.status, &answer.body), (first.status, &first.body), "round {round}");
        }
    }
    assert_eq!(calls.get(), 5);
    assert_eq!(charges(&database).await, 5);
}

/// Makes each `COMMIT` of a charge take 1.5 s: a deferred constraint
/// trigger runs at the commit.
async fn slow_commits(database: &TestDatabase) {
    sqlx::raw_sql(
        "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_sleep(1.5); RETURN NULL; END $$; \
         CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON charges DEFERRABLE INITIALLY DEFERRED \
         FOR EACH ROW EXECUTE FUNCTION slow_commit()",
    )
    .execute(&database.pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_slower_than_the_store_timeout_is_answered_with_its_response() {
    let (database, layer) = setup().await;
    slow_commits(&database).await;
    let layer = layer.with_store_timeout(Duration::from_millis(300)).unwrap();
    let (app, _, calls, _) = charging(&layer);
    let first = send(&app, request("/charge", "k1", "amount=100")).await;
    assert_eq!((first.status, &first.body[..]), (http::StatusCode::CREATED, &b"charge 1"[..]), "{:?}", first.body);
    assert_eq!(charges(&database).await, 1);
    let again = send(&app, request("/charge", "k1", "amount=100")).await;
    assert!(again.replayed(), "{} {:?}", again.status, again.body);
    assert_eq!(calls.get(), 1);
}

async fn long_requests_and_waiters_run_once_under(isolation: &str) {
    let (database, layer) = setup_with_isolation(isolation).await;
    // Requests last longer than a third of the lease: renewals happen.
    let lease = Duration::from_millis(300);
    let layer = layer.with_lease(lease).unwrap().with_in_flight(InFlightPolicy::Wait(Duration::from_secs(20)));
    let (app, gate, calls, _) = charging(&layer);
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request("/hold", "k1", "")).await }
    });
    gate.entered(1).await;
    let waiters: Vec<_> = (0..8)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { send(&app, request("/hold", "k1", "")).await })
        })
        .collect();
    // Time passing is the point: past the renewals.
    tokio::time::sleep(lease).await;
    gate.open(1);
    let first = first.await.unwrap();
    assert_eq!(first.status, 201, "{isolation}: {:?}", first.body);
    for waiter in waiters {
        let answer = waiter.await.unwrap();
        assert_eq!((answer.status, &answer.body), (first.status, &first.body), "{isolation}");
    }
    assert_eq!(calls.get(), 1, "{isolation}");
    assert_eq!(charges(&database).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_repeatable_read_long_requests_and_waiters_run_once() {
    long_requests_and_waiters_run_once_under("repeatable read").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_serializable_long_requests_and_waiters_run_once() {
    long_requests_and_waiters_run_once_under("serializable").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_repeatable_read_duplicates_released_at_once_run_once() {
    let (database, layer) = setup_with_isolation("repeatable read").await;
    let layer = layer.with_in_flight(InFlightPolicy::Wait(Duration::from_secs(20)));
    let (app, _, calls, _) = charging(&layer);
    for round in 0..10 {
        let key: &'static str = Box::leak(format!("k{round}").into_boxed_str());
        let start = std::sync::Arc::new(tokio::sync::Barrier::new(16));
        let duplicates: Vec<_> = (0..16)
            .map(|_| {
                let (app, start) = (app.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    send(&app, request("/charge", key, "amount=100")).await
                })
            })
            .collect();
        for duplicate in duplicates {
            assert_eq!(duplicate.await.unwrap().status, 201);
        }
    }
    assert_eq!(calls.get(), 10);
    assert_eq!(charges(&database).await, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_waiting_for_a_pool_connection_answers_503_and_is_cancelled_not_finished() {
    let database = TestDatabase::create().await;
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&database.url()).await.unwrap();
    let store = TransactionalStore::new(pool.clone());
    store.migrate().await.unwrap();
    sqlx::raw_sql("CREATE TABLE charges (n BIGINT NOT NULL, backend INT NOT NULL)").execute(&pool).await.unwrap();
    let layer = IdempotencyLayer::new(store).with_store_timeout(Duration::from_millis(200)).unwrap();
    let (app, gate, calls, _) = charging(&layer);
    // The first request holds the pool's only connection.
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request("/hold", "k0", "")).await }
    });
    gate.entered(1).await;
    // Not an outage: a pool too small for the requests in flight, said so.
    for n in 1..=5 {
        let answer = send(&app, request("/charge", &format!("k{n}"), "")).await;
        assert_eq!(answer.status, 503, "k{n}: {:?}", answer.body);
        assert_eq!(answer.problem(), "pool-exhausted");
        assert!(answer.headers.contains_key("retry-after"));
        assert!(String::from_utf8_lossy(&answer.body).contains("All 1 connections"), "{:?}", answer.body);
    }
    assert_eq!(layer.metrics().get(tower_idempotency::Outcome::PoolExhausted), 5);
    assert_eq!(layer.metrics().get(tower_idempotency::Outcome::StoreError), 0);
    gate.open(1);
    assert_eq!(first.await.unwrap().status, 201);
    // The pool serves waiters in turn: a claim still on its way would go first.
    assert_eq!(send(&app, request("/charge", "k-last", "")).await.status, 201);
    assert_eq!(calls.get(), 2);
    let fencing = sqlx::raw_sql("SELECT last_value FROM idempotency_records_fencing").fetch_one(&pool).await.unwrap();
    let fencing: i64 = sqlx::Row::get(&fencing, 0);
    assert_eq!(fencing, 2, "claims that timed out ran later for nobody");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_reports_a_live_claim_past_its_lease_in_flight() {
    let database = TestDatabase::create().await;
    let store = TransactionalStore::new(database.pool.clone());
    store.migrate().await.unwrap();
    let id = tower_idempotency::RecordId::from_bytes([3; 32]);
    let request =
        ClaimRequest::new(id, tower_idempotency::Fingerprint::from_bytes([1; 32]), Duration::from_millis(100));
    let Claim::Acquired(lease) = store.claim(request).await.unwrap() else { panic!("not acquired") };
    // Time passing is the point: past the lease, the owner alive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let state = store.lookup(&id).await.unwrap();
    assert!(matches!(state, Some(tower_idempotency::store::RecordState::InFlight { .. })), "{state:?}");
    store.release(&id, lease.owner()).await.unwrap();
    assert!(store.lookup(&id).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_claims_leave_no_transaction_in_the_pool() {
    let database = TestDatabase::create().await;
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&database.url()).await.unwrap();
    let store = TransactionalStore::new(pool.clone());
    store.migrate().await.unwrap();
    sqlx::raw_sql("CREATE TABLE charges (n BIGINT NOT NULL)").execute(&pool).await.unwrap();
    let id = tower_idempotency::RecordId::from_bytes([4; 32]);
    let request = ClaimRequest::new(id, tower_idempotency::Fingerprint::from_bytes([1; 32]), Duration::from_secs(600));
    // Claims dropped at every point of their way.
    for micros in (0..3000).step_by(37) {
        if let Ok(Ok(Claim::Acquired(lease))) =
            tokio::time::timeout(Duration::from_micros(micros), store.claim(request)).await
        {
            store.release(&id, lease.owner()).await.unwrap();
        }
    }
    // The pool's connections hold no transaction: a write through it commits
    // at once, and the key is free within moments.
    for n in 0..4 {
        let insert = format!("INSERT INTO charges (n) VALUES ({n})");
        sqlx::raw_sql(sqlx::AssertSqlSafe(insert)).execute(&pool).await.unwrap();
    }
    let other = sqlx::PgPool::connect(&database.url()).await.unwrap();
    let written = sqlx::raw_sql("SELECT count(*) FROM charges").fetch_one(&other).await.unwrap();
    let written: i64 = sqlx::Row::get(&written, 0);
    assert_eq!(written, 4, "writes through the pool stayed uncommitted");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match TransactionalStore::new(other.clone()).claim(request).await.unwrap() {
            Claim::Acquired(_) => break,
            _ => {
                assert!(tokio::time::Instant::now() < deadline, "a cancelled claim locked its key out");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// The trade `idle_in_transaction_session_timeout` makes (module docs): the
/// server ends the session of a handler that waits on an external call, a
/// retry takes the key over at once and runs the call again, and the first
/// commit fails. The fencing token tells the external system which is newer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_in_transaction_timeout_frees_a_waiting_handlers_key_and_its_commit_fails() {
    let database = TestDatabase::create_with(&[("idle_in_transaction_session_timeout", "300ms")]).await;
    let store = TransactionalStore::new(database.pool.clone());
    store.migrate().await.unwrap();
    sqlx::raw_sql("CREATE TABLE charges (n BIGINT NOT NULL)").execute(&database.pool).await.unwrap();
    let layer = IdempotencyLayer::new(store);
    let gate = Gate::default();
    let (tokens, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let calls = Calls::default();
    let (held, counter) = (gate.clone(), calls.clone());
    let app = app(&layer, move |request: HandlerRequest| {
        let (held, tokens, n) = (held.clone(), tokens.clone(), counter.bump());
        async move {
            let context = request.extensions().get::<tower_idempotency::IdempotencyContext>().unwrap().clone();
            let transaction = request.extensions().get::<RequestTransaction>().unwrap().clone();
            let insert = format!("INSERT INTO charges (n) VALUES ({n})");
            sqlx::raw_sql(sqlx::AssertSqlSafe(insert)).execute(&mut *transaction.lock().await.unwrap()).await.unwrap();
            let _ = tokens.send(context.fencing_token());
            // The external call: the transaction sits idle meanwhile.
            held.pass().await;
            respond(201, format!("charge {n}"))
        }
    });
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request("/hold", "k1", "")).await }
    });
    let first_token = seen.recv().await.unwrap();
    // The server ends the idle session: the retry takes the key over.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let retry = tokio::spawn({
        let app = app.clone();
        async move {
            loop {
                let answer = send(&app, request("/hold", "k1", "")).await;
                if answer.status != 409 || tokio::time::Instant::now() > deadline {
                    return answer;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let retry_token = seen.recv().await.unwrap();
    assert!(retry_token > first_token, "the retry's fencing token does not grow");
    gate.open(2);
    let (first, retry) = (first.await.unwrap(), retry.await.unwrap());
    assert_eq!(retry.status, 201, "{:?}", retry.body);
    assert_eq!(first.status, 503, "{:?}", first.body);
    assert_eq!(first.problem(), "not-committed");
    // The external call ran twice; one charge committed, and it replays.
    assert_eq!(calls.get(), 2);
    assert_eq!(charges(&database).await, 1);
    assert!(send(&app, request("/hold", "k1", "")).await.replayed());
}

/// A TCP proxy to the test's PostgreSQL that the test can cut: `cut()`
/// drops every connection it carries; `refuse(true)` refuses new ones.
struct Proxy {
    port: u16,
    cut: tokio::sync::watch::Sender<u32>,
    refusing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    accepting: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start() -> Self {
        let (host, port) = common::postgres::server_host_port();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_port = listener.local_addr().unwrap().port();
        let (cut, _) = tokio::sync::watch::channel(0);
        let refusing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (cuts, refused) = (cut.clone(), refusing.clone());
        let accepting = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if refused.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                let (mut cuts, target) = (cuts.subscribe(), (host.clone(), port));
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cuts.changed() => {}
                    }
                });
            }
        });
        Self { port: proxy_port, cut, refusing, accepting }
    }

    fn url(&self, database: &TestDatabase) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{}", self.port, database.name)
    }

    fn cut(&self) {
        self.cut.send_modify(|cuts| *cuts += 1);
    }

    fn refuse(&self, refusing: bool) {
        self.refusing.store(refusing, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accepting.abort();
        self.cut();
    }
}

/// A layer whose pool goes through `proxy`, on a database whose `COMMIT`
/// of a charge takes 1.5 s (a deferred constraint trigger).
async fn setup_slow_commit_through(
    proxy: &Proxy,
) -> (TestDatabase, IdempotencyLayer<TransactionalStore>, sqlx::PgPool) {
    let (database, _) = setup().await;
    slow_commits(&database).await;
    let pool = sqlx::PgPool::connect(&proxy.url(&database)).await.unwrap();
    (database, IdempotencyLayer::new(TransactionalStore::new(pool.clone())), pool)
}

/// Returns once a backend of `database` runs `COMMIT`.
async fn committing(database: &TestDatabase) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let running = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                   AND state = 'active' AND query = 'COMMIT'";
    loop {
        let row = sqlx::raw_sql(running).fetch_one(&database.pool).await.unwrap();
        if sqlx::Row::get::<i64, _>(&row, 0) > 0 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "no COMMIT ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A charge whose connection the proxy cuts while its `COMMIT` runs (the
/// server finishes it); with `unreachable`, the proxy also refuses new
/// connections from then on. Returns the charge's answer.
async fn a_charge_cut_while_committing(
    unreachable: bool,
) -> (Proxy, TestDatabase, IdempotencyLayer<TransactionalStore>, App, Calls, Answer) {
    let proxy = Proxy::start().await;
    let (database, layer, _pool) = setup_slow_commit_through(&proxy).await;
    let (app, _, calls, _) = charging(&layer);
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request("/charge", "k1", "amount=100")).await }
    });
    committing(&database).await;
    proxy.refuse(unreachable);
    proxy.cut();
    let first = first.await.unwrap();
    (proxy, database, layer, app, calls, first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_connection_is_lost_is_found_out_and_answered_with_its_response() {
    let (_proxy, database, _layer, app, calls, first) = a_charge_cut_while_committing(false).await;
    assert_eq!((first.status, &first.body[..]), (http::StatusCode::CREATED, &b"charge 1"[..]), "{:?}", first.body);
    assert_eq!(charges(&database).await, 1);
    assert!(send(&app, request("/charge", "k1", "amount=100")).await.replayed());
    assert_eq!(calls.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_outcome_cannot_be_found_out_says_so_and_the_retry_is_safe() {
    // The database is out of reach while the COMMIT runs, and after.
    let (proxy, database, _layer, app, calls, first) = a_charge_cut_while_committing(true).await;
    assert_eq!(first.status, 503, "{:?}", first.body);
    assert_eq!(first.problem(), "commit-unknown");
    assert!(first.headers.contains_key("retry-after"));
    // It commits: the retry with the same key replays it, once the server
    // has finished the COMMIT (409 until then).
    proxy.refuse(false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let retry = loop {
        let retry = send(&app, request("/charge", "k1", "amount=100")).await;
        if retry.status != 409 || tokio::time::Instant::now() > deadline {
            break retry;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(retry.replayed(), "{} {:?}", retry.status, retry.body);
    assert_eq!((calls.get(), charges(&database).await), (1, 1));
}

/// sqlx's `begin()` on the request's connection makes a savepoint; when
/// the savepoint fails, sqlx rolls back the whole transaction, the key's
/// locks with it. The layer must not then commit a record on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_its_handler_ended_commits_nothing_and_the_retry_runs() {
    let (database, layer) = setup().await;
    let calls = Calls::default();
    let counter = calls.clone();
    let app = app(&layer, move |request: HandlerRequest| {
        let n = counter.bump();
        async move {
            let transaction = request.extensions().get::<RequestTransaction>().unwrap().clone();
            let mut connection = transaction.lock().await.unwrap();
            let insert = format!("INSERT INTO charges (n, backend) VALUES ({n}, 0)");
            sqlx::raw_sql(sqlx::AssertSqlSafe(insert)).execute(&mut *connection).await.unwrap();
            if n == 1 {
                assert!(sqlx::raw_sql("SELECT 1 / 0").execute(&mut *connection).await.is_err());
                // The transaction is aborted: the savepoint fails, and sqlx rolls back.
                assert!(sqlx::Connection::begin(&mut *connection).await.is_err());
            }
            respond(201, format!("charge {n}"))
        }
    });
    let first = send(&app, request("/charge", "k1", "")).await;
    assert_eq!(first.status, 503, "{:?}", first.body);
    assert_eq!(first.problem(), "not-committed");
    assert_eq!(charges(&database).await, 0);
    let retry = send(&app, request("/charge", "k1", "")).await;
    assert_eq!((retry.status, retry.replayed()), (http::StatusCode::CREATED, false));
    assert_eq!((calls.get(), charges(&database).await), (2, 1));
}
