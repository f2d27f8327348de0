//! Model-based: random sequences of claim / complete / release / renew /
//! expire against a store, each step compared with a plain reference model.

mod common;

use std::{collections::HashMap, future::Future, time::Duration};

use proptest::prelude::*;
use tower_idempotency::{
    FencingToken, Fingerprint, Record, RecordId,
    store::{Claim, ClaimRequest, Lease, MemoryStore, RecordState, Store, StoreError},
};

const IDS: usize = 3;
const LEASE: Duration = Duration::from_secs(10);
const RETENTION: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
enum Op {
    Claim {
        id: usize,
        fingerprint: u8,
        replace: bool,
    },
    Complete {
        lease: usize,
    },
    Release {
        lease: usize,
    },
    Renew {
        lease: usize,
    },
    /// Every in-flight lease runs out.
    Expire,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..IDS, 0u8..2, any::<bool>()).prop_map(|(id, fingerprint, replace)| Op::Claim { id, fingerprint, replace }),
        2 => any::<usize>().prop_map(|lease| Op::Complete { lease }),
        1 => any::<usize>().prop_map(|lease| Op::Release { lease }),
        1 => any::<usize>().prop_map(|lease| Op::Renew { lease }),
        1 => Just(Op::Expire),
    ]
}

/// What the model says a record is.
#[derive(Debug, Clone, PartialEq)]
enum State {
    Absent,
    InFlight { lease: usize, fingerprint: u8 },
    Completed { fingerprint: u8 },
}

fn fingerprint(n: u8) -> Fingerprint {
    Fingerprint::from_bytes([n; 32])
}

/// Runs `ops` against `store`, with `expire` making every in-flight lease
/// run out, and checks each answer against the model.
async fn check<St, E, F>(store: &St, ids: [RecordId; IDS], ops: &[Op], expire: E)
where
    St: Store,
    E: Fn(Vec<RecordId>) -> F,
    F: Future<Output = ()>,
{
    let mut model = [State::Absent, State::Absent, State::Absent];
    // Every lease the store granted, with the record it is for.
    let mut leases: Vec<(usize, Lease)> = Vec::new();
    let mut highest: HashMap<usize, FencingToken> = HashMap::new();
    for (step, op) in ops.iter().enumerate() {
        let context = format!("step {step}: {op:?}, model {model:?}");
        match *op {
            Op::Claim { id, fingerprint: fp, replace } => {
                let request = ClaimRequest::new(ids[id], fingerprint(fp), LEASE).with_replace_completed(replace);
                let answer = store.claim(request).await.unwrap();
                match (&model[id], answer) {
                    (State::Absent, Claim::Acquired(lease)) | (State::Completed { .. }, Claim::Acquired(lease))
                        if matches!(model[id], State::Absent) || replace =>
                    {
                        if let Some(previous) = highest.get(&id) {
                            assert!(lease.fencing_token() > *previous, "fencing token did not grow: {context}");
                        }
                        highest.insert(id, lease.fencing_token());
                        leases.push((id, lease));
                        model[id] = State::InFlight { lease: leases.len() - 1, fingerprint: fp };
                    }
                    (State::InFlight { fingerprint: holder, .. }, Claim::InFlight { fingerprint: seen }) => {
                        assert_eq!(seen, fingerprint(*holder), "{context}");
                    }
                    (State::InFlight { fingerprint: holder, .. }, Claim::InFlightMismatch) => {
                        assert_ne!(fp, *holder, "{context}");
                    }
                    (State::Completed { fingerprint: done }, Claim::Completed(record)) if !replace => {
                        assert_eq!(record, sample(*done), "{context}");
                    }
                    (_, answer) => panic!("unexpected {answer:?} at {context}"),
                }
            }
            Op::Complete { lease } | Op::Release { lease } | Op::Renew { lease } => {
                if leases.is_empty() {
                    continue;
                }
                let index = lease % leases.len();
                let (id, lease) = leases[index];
                let current = matches!(model[id], State::InFlight { lease, .. } if lease == index);
                let result = match op {
                    Op::Complete { .. } => {
                        let fp = match model[id] {
                            State::InFlight { fingerprint, .. } => fingerprint,
                            _ => 0,
                        };
                        let result = store.complete(&ids[id], lease.owner(), sample(fp), RETENTION).await;
                        if current {
                            model[id] = State::Completed { fingerprint: fp };
                        }
                        result
                    }
                    Op::Release { .. } => {
                        let result = store.release(&ids[id], lease.owner()).await;
                        if current {
                            model[id] = State::Absent;
                        }
                        result
                    }
                    _ => store.renew(&ids[id], lease.owner(), LEASE).await,
                };
                match (current, result) {
                    (true, Ok(())) | (false, Err(StoreError::NotOwner)) => {}
                    (_, result) => panic!("owner {current}, got {result:?} at {context}"),
                }
            }
            Op::Expire => {
                let in_flight: Vec<RecordId> =
                    (0..IDS).filter(|&id| matches!(model[id], State::InFlight { .. })).map(|id| ids[id]).collect();
                expire(in_flight).await;
                for state in &mut model {
                    if matches!(state, State::InFlight { .. }) {
                        *state = State::Absent;
                    }
                }
            }
        }
        for id in 0..IDS {
            let seen = store.lookup(&ids[id]).await.unwrap();
            match (&model[id], seen) {
                (State::Absent, None) => {}
                (
                    State::InFlight { fingerprint: fp, lease },
                    Some(RecordState::InFlight { fingerprint: seen, fencing_token }),
                ) => {
                    common::conformance::assert_fingerprint_if_kept(seen, fingerprint(*fp));
                    common::conformance::assert_token_if_kept(fencing_token, leases[*lease].1.fencing_token());
                }
                (State::Completed { fingerprint: fp }, Some(RecordState::Completed(record))) => {
                    assert_eq!(record, sample(*fp), "{context}");
                }
                (state, seen) => panic!("record {id} is {seen:?}, the model says {state:?}, at {context}"),
            }
        }
    }
}

fn sample(fp: u8) -> Record {
    common::conformance::sample_record(fingerprint(fp))
}

fn fresh_ids() -> [RecordId; IDS] {
    [common::conformance::fresh_id(), common::conformance::fresh_id(), common::conformance::fresh_id()]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn memory_store_follows_the_model(ops in prop::collection::vec(op(), 1..40)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        runtime.block_on(async {
            let store = MemoryStore::new();
            let expire = |_| tokio::time::advance(LEASE + Duration::from_secs(1));
            check(&store, fresh_ids(), &ops, expire).await;
        });
    }
}

#[cfg(feature = "redis")]
proptest! {
    #![proptest_config(ProptestConfig { cases: 40, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn redis_store_follows_the_model(ops in prop::collection::vec(op(), 1..40)) {
        use tower_idempotency::store::redis::RedisStore;

        let server = common::redis::shared_server();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let store = RedisStore::new(server.pool());
            // Expiry is Redis's own TTL: cut it short, then let it pass.
            let expire = |ids: Vec<RecordId>| {
                let keys: Vec<String> = ids.iter().map(|id| store.record_key(id)).collect();
                async move {
                    for key in &keys {
                        server.command(&["PEXPIRE", key, "1"]);
                    }
                    for key in &keys {
                        while server.command(&["EXISTS", key]).trim() != ":0" {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
            };
            check(&store, fresh_ids(), &ops, expire).await;
        });
    }
}

#[cfg(feature = "postgres")]
proptest! {
    #![proptest_config(ProptestConfig { cases: 20, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn postgres_store_follows_the_model(ops in prop::collection::vec(op(), 1..40)) {
        use tower_idempotency::store::postgres::sqlx;

        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let database = common::postgres::TestDatabase::create().await;
            let store = database.plain_store();
            store.migrate().await.unwrap();
            // Expiry is the database's clock: move the leases' ends into the past.
            let expire = |ids: Vec<RecordId>| {
                let pool = database.pool.clone();
                async move {
                    let ids: Vec<Vec<u8>> = ids.iter().map(|id| id.as_bytes().to_vec()).collect();
                    // In a transaction, unnamed: safe behind PgBouncer too.
                    let mut transaction = pool.begin().await.unwrap();
                    sqlx::query("UPDATE idempotency_records SET expires_at = now() - interval '1 second' WHERE id = ANY($1)")
                        .persistent(false)
                        .bind(ids)
                        .execute(&mut *transaction)
                        .await
                        .unwrap();
                    transaction.commit().await.unwrap();
                }
            };
            check(&store, fresh_ids(), &ops, expire).await;
        });
    }
}
