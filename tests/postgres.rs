//! The PostgreSQL store under the layer, on the PostgreSQL at
//! 127.0.0.1:5432: each test in a database of its own.
#![cfg(feature = "postgres")]

mod common;

use std::time::Duration;

use common::{postgres::TestDatabase, *};
use tower_idempotency::{
    IdempotencyLayer, InFlightPolicy,
    store::postgres::{PostgresStore, sqlx},
};

/// Claims made so far: each claim statement takes a fencing token, granted
/// or not, and a sequence counts at once, outside transactions.
async fn claims(database: &TestDatabase) -> i64 {
    let row =
        sqlx::raw_sql("SELECT last_value FROM idempotency_records_fencing").fetch_one(&database.pool).await.unwrap();
    sqlx::Row::get(&row, 0)
}

/// `waiters` duplicates wait while the first request runs on for `held`;
/// each gets the first's answer replayed, the handler runs once. Returns the
/// claims they made.
async fn claims_of_waiters(database: &TestDatabase, store: PostgresStore, waiters: usize, held: Duration) -> i64 {
    store.migrate().await.unwrap();
    let layer = IdempotencyLayer::new(store).with_in_flight(InFlightPolicy::Wait(Duration::from_secs(10)));
    let (app, gate, calls) = gated(&layer);
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, hold("k")).await }
    });
    gate.entered(1).await;
    let before = claims(database).await;
    let waiters: Vec<_> = (0..waiters)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { send(&app, hold("k")).await })
        })
        .collect();
    // Time passing is the point: the first request runs on.
    tokio::time::sleep(held).await;
    gate.open(1);
    let first = first.await.unwrap();
    for waiter in waiters {
        let answer = waiter.await.unwrap();
        assert!(answer.replayed(), "a waiting duplicate: {}", answer.status);
        assert_eq!(answer.body, first.body);
    }
    assert_eq!(calls.get(), 1);
    claims(database).await - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_duplicates_listen_instead_of_polling() {
    let database = TestDatabase::create().await;
    let claims = claims_of_waiters(&database, database.plain_store(), 8, Duration::from_secs(2)).await;
    assert!(claims <= 8 * 4, "{claims} claims by 8 duplicates waiting 2 s: they poll");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_duplicates_poll_a_bounded_number_of_times_without_listening() {
    let database = TestDatabase::create().await;
    let store = database.plain_store().with_listen_url(None);
    let claims = claims_of_waiters(&database, store, 4, Duration::from_secs(1)).await;
    // Every 100 ms for a second, and a little slack for the machine.
    assert!(claims <= 4 * 15, "{claims} claims by 4 duplicates polling for 1 s");
}
