//! The worker guard: one run per key, replays, payload checks, in-flight
//! policies, failures, panics, cancellation and lost leases, on the memory
//! store, Redis and transactional PostgreSQL.
#![cfg(feature = "guard")]

mod common;

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::Gate;
use tower_idempotency::{
    CompletedStrategy, Store,
    guard::{Failure, Guard, GuardError, InFlight, Outcome, Work},
};

/// A charge that counts its runs and answers its run's number.
#[derive(Clone, Default)]
struct Processor(Arc<AtomicUsize>);

impl Processor {
    async fn charge(&self, _: Work) -> Result<String, std::io::Error> {
        let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(format!("ch_{n}"))
    }

    fn runs(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

fn order(id: &str) -> serde_json::Value {
    serde_json::json!({"order_id": id, "amount": 500, "currency": "usd"})
}

async fn runs_once_and_replays<St: Store + Clone>(guard: Guard<St>) {
    let processor = Processor::default();
    let first = guard.run("order:o-1", &order("o-1"), |work| processor.charge(work)).await.unwrap();
    let again = guard.run("order:o-1", &order("o-1"), |work| processor.charge(work)).await.unwrap();
    assert_eq!(first, Outcome::Ran("ch_1".to_owned()));
    assert_eq!(again, Outcome::Replayed("ch_1".to_owned()));
    let changed = serde_json::json!({"order_id": "o-1", "amount": 999});
    let other = guard.run("order:o-1", &changed, |work| processor.charge(work)).await;
    assert!(matches!(other, Err(GuardError::PayloadMismatch)));
    assert_eq!(processor.runs(), 1);
}

#[tokio::test]
async fn memory_runs_once_and_replays() {
    runs_once_and_replays(Guard::memory()).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_runs_once_and_replays() {
    let server = common::redis::RedisServer::start();
    runs_once_and_replays(Guard::new(tower_idempotency::store::redis::RedisStore::new(server.pool()))).await;
}

#[tokio::test]
async fn a_payload_is_the_same_whatever_its_key_order() {
    let guard = Guard::memory();
    let processor = Processor::default();
    let mut forward = HashMap::new();
    let mut backward = HashMap::new();
    for n in 0..20 {
        forward.insert(format!("field-{n}"), n);
        backward.insert(format!("field-{}", 19 - n), 19 - n);
    }
    guard.run("k", &forward, |work| processor.charge(work)).await.unwrap();
    assert!(guard.run("k", &backward, |work| processor.charge(work)).await.unwrap().is_replayed());
    let anonymous = tower_idempotency::Scope::anonymous();
    let bytes = guard.run_bytes(&anonymous, "b", b"raw", |work| processor.charge(work)).await;
    assert!(!bytes.unwrap().is_replayed());
    assert_eq!(processor.runs(), 2);
}

#[tokio::test]
async fn a_run_in_flight_is_refused_with_a_delay_or_waited_for() {
    for policy in [InFlight::Reject, InFlight::Wait(Duration::from_secs(10))] {
        let guard = Guard::memory().on_in_flight(policy);
        let gate = Gate::default();
        let processor = Processor::default();
        let first = tokio::spawn({
            let (guard, gate, processor) = (guard.clone(), gate.clone(), processor.clone());
            async move {
                guard
                    .run("k", &order("o-2"), |work| async move {
                        gate.pass().await;
                        processor.charge(work).await
                    })
                    .await
            }
        });
        gate.entered(1).await;
        let second = tokio::spawn({
            let (guard, processor) = (guard.clone(), processor.clone());
            async move { guard.run("k", &order("o-2"), |work| processor.charge(work)).await }
        });
        if policy == InFlight::Reject {
            let refused = second.await.unwrap().unwrap_err();
            assert!(matches!(refused, GuardError::InFlight { retry_after } if retry_after > Duration::ZERO));
            gate.open(1);
            assert_eq!(first.await.unwrap().unwrap(), Outcome::Ran("ch_1".to_owned()));
        } else {
            gate.open(1);
            assert_eq!(first.await.unwrap().unwrap(), Outcome::Ran("ch_1".to_owned()));
            assert_eq!(second.await.unwrap().unwrap(), Outcome::Replayed("ch_1".to_owned()));
        }
        assert_eq!(processor.runs(), 1);
    }
}

#[tokio::test]
async fn a_failure_is_released_by_default_and_replayed_when_recorded() {
    let declined = |_: Work| async { Err::<String, _>("card declined") };
    let released = Guard::memory();
    assert!(matches!(released.run("k", &1, declined).await, Err(GuardError::Failed("card declined"))));
    let processor = Processor::default();
    assert_eq!(released.run("k", &1, |work| processor.charge(work)).await.unwrap(), Outcome::Ran("ch_1".to_owned()));

    let recorded = Guard::memory().on_failure(Failure::Record);
    assert!(matches!(recorded.run("k", &1, declined).await, Err(GuardError::Failed(_))));
    let replayed = recorded.run("k", &1, |work| processor.charge(work)).await.unwrap_err();
    assert!(matches!(&replayed, GuardError::FailedBefore(message) if message == "card declined"), "{replayed}");
    assert_eq!(processor.runs(), 1);
}

#[tokio::test]
async fn a_panic_in_the_work_releases_the_key_or_records_it() {
    for failure in [Failure::Release, Failure::Record] {
        let guard = Guard::memory().on_failure(failure);
        let panicked = tokio::spawn({
            let guard = guard.clone();
            async move {
                guard
                    .run("k", &1, |_| async { panic!("the processor client panicked") as Result<String, String> })
                    .await
            }
        });
        assert!(panicked.await.unwrap_err().is_panic(), "the panic goes on to the caller");
        let processor = Processor::default();
        let next = guard.run("k", &1, |work| processor.charge(work)).await;
        match failure {
            Failure::Release => assert_eq!(next.unwrap(), Outcome::Ran("ch_1".to_owned())),
            Failure::Record => assert!(matches!(next, Err(GuardError::FailedBefore(_)))),
        }
    }
}

#[tokio::test]
async fn a_cancelled_run_gives_its_key_back_at_once() {
    let guard = Guard::memory();
    let gate = Gate::default();
    let cancelled = tokio::spawn({
        let (guard, gate) = (guard.clone(), gate.clone());
        async move {
            guard
                .run("k", &1, |_| async move {
                    gate.pass().await;
                    Ok::<_, String>(0)
                })
                .await
        }
    });
    gate.entered(1).await;
    cancelled.abort();
    assert!(cancelled.await.unwrap_err().is_cancelled());
    // The key is given back on a task of its own: a few turns of the runtime.
    let processor = Processor::default();
    for _ in 0..100 {
        match guard.run("k", &1, |work| processor.charge(work)).await {
            Err(GuardError::InFlight { .. }) => tokio::task::yield_now().await,
            ran => {
                assert_eq!(ran.unwrap(), Outcome::Ran("ch_1".to_owned()));
                return;
            }
        }
    }
    panic!("the cancelled run kept its key");
}

#[tokio::test(start_paused = true)]
async fn a_run_that_outlives_its_lease_is_told_and_changes_nothing() {
    // No renewal: the ceiling is the lease.
    let guard = Guard::memory().with_lease(Duration::from_secs(1)).unwrap().with_lease_ceiling(Duration::from_secs(1));
    let guard = guard.unwrap();
    let gate = Gate::default();
    let slow = tokio::spawn({
        let (guard, gate) = (guard.clone(), gate.clone());
        async move {
            guard
                .run("k", &1, |_| async move {
                    gate.pass().await;
                    Ok::<_, String>("slow".to_owned())
                })
                .await
        }
    });
    gate.entered(1).await;
    tokio::time::advance(Duration::from_secs(2)).await;
    let fast = guard.run("k", &1, |_| async { Ok::<_, String>("fast".to_owned()) }).await.unwrap();
    assert_eq!(fast, Outcome::Ran("fast".to_owned()));
    gate.open(1);
    assert!(matches!(slow.await.unwrap(), Err(GuardError::LeaseLost)));
    let kept = guard.run("k", &1, |_| async { Ok::<_, String>("again".to_owned()) }).await.unwrap();
    assert_eq!(kept, Outcome::Replayed("fast".to_owned()), "the stale owner's result replaced the current one's");
}

#[tokio::test]
async fn completed_keys_replay_refuse_or_rerun_by_strategy() {
    let processor = Processor::default();
    let rejecting = Guard::memory().with_completed(CompletedStrategy::Reject);
    rejecting.run("k", &1, |work| processor.charge(work)).await.unwrap();
    assert!(matches!(rejecting.run("k", &1, |work| processor.charge(work)).await, Err(GuardError::AlreadyUsed)));
    let rerunning = Guard::memory().with_completed(CompletedStrategy::Rerun);
    rerunning.run("k", &1, |work| processor.charge(work)).await.unwrap();
    assert_eq!(rerunning.run("k", &1, |work| processor.charge(work)).await.unwrap(), Outcome::Ran("ch_3".to_owned()));
    assert_eq!(processor.runs(), 3);
    assert!(matches!(Guard::memory().run("", &1, |work| processor.charge(work)).await, Err(GuardError::InvalidKey(_))));
}

/// On transactional PostgreSQL the work writes through the run's
/// transaction: its row commits with the result, or, when the work fails,
/// not at all.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_transactional_postgresql_the_work_commits_with_its_result() {
    use tower_idempotency::store::postgres::{TransactionalStore, sqlx};
    let database = common::postgres::TestDatabase::create().await;
    let store = TransactionalStore::new(database.pool.clone());
    store.migrate().await.unwrap();
    sqlx::raw_sql("CREATE TABLE worker_charges (order_id TEXT NOT NULL)").execute(&database.pool).await.unwrap();
    let guard = Guard::new(store);
    let charge = |order_id: &'static str, fail: bool| {
        move |work: Work| async move {
            let transaction = work.transaction().expect("a transactional store hands out its transaction");
            let mut connection = transaction.lock().await.map_err(|error| error.to_string())?;
            sqlx::query("INSERT INTO worker_charges (order_id) VALUES ($1)")
                .bind(order_id)
                .execute(&mut *connection)
                .await
                .map_err(|error| error.to_string())?;
            if fail { Err("declined after the write".to_owned()) } else { Ok(order_id.to_owned()) }
        }
    };
    assert_eq!(guard.run("order:a", &"a", charge("a", false)).await.unwrap(), Outcome::Ran("a".to_owned()));
    assert!(guard.run("order:a", &"a", charge("a", false)).await.unwrap().is_replayed());
    assert!(matches!(guard.run("order:b", &"b", charge("b", true)).await, Err(GuardError::Failed(_))));
    let rows = sqlx::raw_sql("SELECT order_id FROM worker_charges ORDER BY order_id").fetch_all(&database.pool).await;
    let rows: Vec<String> = rows.unwrap().iter().map(|row| sqlx::Row::get(row, 0)).collect();
    assert_eq!(rows, ["a"], "one row for the charge, none for the failed run");
}

/// A result that cannot be kept as JSON is an error after the work ran: the
/// key is kept as run without a result, never run again.
#[tokio::test]
async fn a_result_that_cannot_be_encoded_never_runs_again() {
    let guard = Guard::memory();
    let runs = Processor::default();
    let unencodable = |_: Work| {
        let runs = runs.clone();
        async move {
            runs.0.fetch_add(1, Ordering::SeqCst);
            // JSON object keys must be strings.
            Ok::<HashMap<Vec<u8>, u8>, String>(HashMap::from([(vec![1u8], 1u8)]))
        }
    };
    assert!(matches!(guard.run("k", &1, unencodable).await, Err(GuardError::ResultNotEncoded(_))));
    assert!(matches!(guard.run("k", &1, unencodable).await, Err(GuardError::NotKept)));
    assert_eq!(runs.runs(), 1);
}

/// A memory store whose completions wait at a gate.
#[derive(Clone, Default)]
struct SlowToComplete {
    inner: tower_idempotency::store::MemoryStore,
    gate: Gate,
}

impl Store for SlowToComplete {
    async fn claim(
        &self,
        request: tower_idempotency::store::ClaimRequest,
    ) -> Result<tower_idempotency::store::Claim, tower_idempotency::store::StoreError> {
        self.inner.claim(request).await
    }

    async fn complete(
        &self,
        id: &tower_idempotency::RecordId,
        owner: tower_idempotency::store::OwnerToken,
        record: tower_idempotency::Record,
        retention: Duration,
    ) -> Result<(), tower_idempotency::store::StoreError> {
        self.gate.pass().await;
        self.inner.complete(id, owner, record, retention).await
    }

    async fn release(
        &self,
        id: &tower_idempotency::RecordId,
        owner: tower_idempotency::store::OwnerToken,
    ) -> Result<(), tower_idempotency::store::StoreError> {
        self.inner.release(id, owner).await
    }

    async fn renew(
        &self,
        id: &tower_idempotency::RecordId,
        owner: tower_idempotency::store::OwnerToken,
        lease: Duration,
    ) -> Result<(), tower_idempotency::store::StoreError> {
        self.inner.renew(id, owner, lease).await
    }

    async fn lookup(
        &self,
        id: &tower_idempotency::RecordId,
    ) -> Result<Option<tower_idempotency::store::RecordState>, tower_idempotency::store::StoreError> {
        self.inner.lookup(id).await
    }
}

/// A caller that stops waiting once the work has run (a timeout around the
/// run, a shutdown) while its result is being kept: the result is kept all
/// the same, and the next delivery replays it instead of running again.
#[tokio::test]
async fn a_run_cancelled_while_its_result_is_kept_still_keeps_it() {
    let store = SlowToComplete::default();
    let guard = Guard::new(store.clone());
    let processor = Processor::default();
    let cancelled = tokio::spawn({
        let (guard, processor) = (guard.clone(), processor.clone());
        async move { guard.run("k", &1, |work| processor.charge(work)).await }
    });
    store.gate.entered(1).await;
    cancelled.abort();
    assert!(cancelled.await.unwrap_err().is_cancelled());
    store.gate.open(1);
    for _ in 0..100 {
        match guard.run("k", &1, |work| processor.charge(work)).await {
            Err(GuardError::InFlight { .. }) => tokio::task::yield_now().await,
            next => {
                assert_eq!(next.unwrap(), Outcome::Replayed("ch_1".to_owned()));
                assert_eq!(processor.runs(), 1);
                return;
            }
        }
    }
    panic!("the result of a run whose caller stopped waiting was never kept");
}

/// Under `Rerun`, a run that waited for a concurrent one gets its result:
/// only a key that had finished before runs again.
#[tokio::test]
async fn under_rerun_a_run_that_waited_replays() {
    let guard =
        Guard::memory().with_completed(CompletedStrategy::Rerun).on_in_flight(InFlight::Wait(Duration::from_secs(10)));
    let gate = Gate::default();
    let processor = Processor::default();
    let first = tokio::spawn({
        let (guard, gate, processor) = (guard.clone(), gate.clone(), processor.clone());
        async move {
            guard
                .run("k", &1, |work| async move {
                    gate.pass().await;
                    processor.charge(work).await
                })
                .await
        }
    });
    gate.entered(1).await;
    let second = tokio::spawn({
        let (guard, processor) = (guard.clone(), processor.clone());
        async move { guard.run("k", &1, |work| processor.charge(work)).await }
    });
    tokio::task::yield_now().await;
    gate.open(1);
    assert_eq!(first.await.unwrap().unwrap(), Outcome::Ran("ch_1".to_owned()));
    assert_eq!(second.await.unwrap().unwrap(), Outcome::Replayed("ch_1".to_owned()));
    assert_eq!(processor.runs(), 1);
}

/// A result larger than the limit is the run's, and not kept: later runs
/// never run again, and say so.
#[tokio::test]
async fn a_result_over_the_limit_is_returned_but_not_kept() {
    let guard = Guard::memory().with_result_limit(16);
    let processor = Processor::default();
    let large = |work: Work| {
        let processor = processor.clone();
        async move { processor.charge(work).await.map(|id| id.repeat(10)) }
    };
    assert_eq!(guard.run("k", &1, large).await.unwrap(), Outcome::Ran("ch_1".repeat(10)));
    assert!(matches!(guard.run("k", &1, large).await, Err(GuardError::NotKept)));
    assert_eq!(processor.runs(), 1);
}

/// A run is a future that can be spawned, on every store.
#[allow(dead_code, reason = "compiled, not run: the bounds are what is tested")]
fn runs_can_be_spawned<St: Store + Clone>(guard: Guard<St>) {
    tokio::spawn(async move {
        let order = order("o-1");
        guard.run("k", &order, |work| async move { Ok::<_, String>(work.fencing_token().get()) }).await
    });
}
