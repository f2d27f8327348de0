//! Load with concurrent duplicates: four service instances (separate pools)
//! sharing one Redis, or a three-node cluster; every key sent by eight
//! concurrent duplicates spread over the instances. Exactly one execution
//! per key; every answer is the first answer's bytes or a 409.
//!
//! The short versions run with the suite; the 5,000-key ones with
//! `cargo test --all-features --test load -- --ignored`.
#![cfg(feature = "redis")]

mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use common::{redis::*, *};
use tokio::sync::Semaphore;
use tower_idempotency::{IdempotencyLayer, Store};

const DUPLICATES: usize = 8;
const INSTANCES: usize = 4;

async fn storm<St: Store + Clone>(instances: Vec<IdempotencyLayer<St>>, keys: usize) {
    // One counter for every instance: they run in this process.
    let executions: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let apps: Vec<App> = instances
        .iter()
        .map(|layer| {
            let executions = executions.clone();
            app(layer, move |request: HandlerRequest| {
                let key = request.headers()["idempotency-key"].to_str().unwrap().to_owned();
                let n = {
                    let mut executions = executions.lock().unwrap();
                    let n = executions.entry(key.clone()).or_default();
                    *n += 1;
                    *n
                };
                async move { respond(201, format!("{key} run {n}")) }
            })
        })
        .collect();
    let run = format!("{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    let in_flight = Arc::new(Semaphore::new(256));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(keys * DUPLICATES);
    for k in 0..keys {
        for d in 0..DUPLICATES {
            let app = apps[(k + d) % INSTANCES].clone();
            let in_flight = in_flight.clone();
            let key = format!("load-{run}-{k}");
            tasks.push(tokio::spawn(async move {
                let _permit = in_flight.acquire_owned().await.unwrap();
                let request = http::Request::post("/v1/charges")
                    .header("idempotency-key", key.as_str())
                    .header("authorization", AUTH)
                    .body(http_body_util::Full::new(bytes::Bytes::from_static(b"amount=1")))
                    .unwrap();
                (k, send(&app, request).await)
            }));
        }
    }
    let mut answers: HashMap<usize, Vec<Answer>> = HashMap::new();
    for task in tasks {
        let (k, answer) = task.await.unwrap();
        answers.entry(k).or_default().push(answer);
    }
    let elapsed = started.elapsed();

    let executions = executions.lock().unwrap();
    assert_eq!(executions.len(), keys, "every key ran");
    assert!(executions.values().all(|&n| n == 1), "a key ran twice");
    let mut conflicts = 0;
    for (k, answers) in &answers {
        let first = format!("load-{run}-{k} run 1");
        for answer in answers {
            match answer.status.as_u16() {
                201 => assert_eq!(answer.body, first.as_bytes(), "key {k} got another answer"),
                409 => conflicts += 1,
                other => panic!("key {k}: status {other}"),
            }
        }
        assert!(answers.iter().any(|a| a.status == 201), "key {k} got no answer at all");
    }
    println!(
        "{keys} keys x {DUPLICATES} duplicates over {INSTANCES} instances: {} requests in {elapsed:?}, \
         {keys} executions, {conflicts} answered 409",
        keys * DUPLICATES
    );
}

fn redis_instances(server: &RedisServer) -> Vec<IdempotencyLayer<tower_idempotency::store::redis::RedisStore>> {
    (0..INSTANCES).map(|_| IdempotencyLayer::redis(server.pool())).collect()
}

fn cluster_instances(
    cluster: &RedisCluster,
) -> Vec<IdempotencyLayer<tower_idempotency::store::redis::RedisClusterStore>> {
    (0..INSTANCES).map(|_| IdempotencyLayer::redis_cluster(cluster.pool())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_instances_on_redis_execute_each_key_once() {
    let server = RedisServer::start();
    storm(redis_instances(&server), 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_instances_on_a_cluster_execute_each_key_once() {
    storm(cluster_instances(RedisCluster::shared()), 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: 40,000 requests"]
async fn five_thousand_keys_on_redis() {
    let server = RedisServer::start();
    storm(redis_instances(&server), 5_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: 40,000 requests"]
async fn five_thousand_keys_on_a_cluster() {
    storm(cluster_instances(RedisCluster::shared()), 5_000).await;
}
