//! The layer on Redis and Redis Cluster: round trips, faults, replicas.
#![cfg(feature = "redis")]

mod common;

use std::{
    io::{BufRead, BufReader, Write},
    net::TcpStream,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use common::{redis::*, *};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tower_idempotency::{
    IdempotencyLayer, InFlightPolicy, Outcome,
    store::{
        Claim, ClaimRequest, RecordState, Store, StoreError,
        redis::{RedisClusterStore, RedisStore, deadpool_redis},
    },
};

const KEY: Option<&str> = Some("order-1");

/// Every command clients send a server, as `MONITOR` shows them, without
/// the ones scripts run inside.
struct Monitor {
    lines: Arc<Mutex<Vec<String>>>,
    port: u16,
}

impl Monitor {
    fn start(server: &RedisServer) -> Self {
        let mut stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        stream.write_all(b"MONITOR\r\n").unwrap();
        let mut reader = BufReader::new(stream);
        let mut ok = String::new();
        reader.read_line(&mut ok).unwrap();
        assert!(ok.starts_with("+OK"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in reader.lines() {
                let Ok(line) = line else { return };
                sink.lock().unwrap().push(line);
            }
        });
        Self { lines, port: server.port }
    }

    /// The client commands since the last call, script internals and the
    /// harness's own commands left out. A sentinel `PING` marks the end, so
    /// no command still in flight to the monitor is missed.
    fn take(&self) -> Vec<String> {
        let sentinel = format!("sentinel-{}", rand_u64());
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream.write_all(format!("PING {sentinel}\r\n").as_bytes()).unwrap();
        let mut reply = String::new();
        BufReader::new(&stream).read_line(&mut reply).unwrap();
        loop {
            let mut lines = self.lines.lock().unwrap();
            if let Some(end) = lines.iter().position(|line| line.contains(&sentinel)) {
                let seen: Vec<String> = lines.drain(..=end).collect();
                return seen
                    .into_iter()
                    .filter(|line| !line.contains(" lua]") && !line.contains(&sentinel))
                    .map(|line| line.split_once("] ").map_or(line.clone(), |(_, command)| command.to_owned()))
                    .collect();
            }
            drop(lines);
            std::thread::yield_now();
        }
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

/// The commands' names, a transaction (`MULTI` … `EXEC`, written at once:
/// one round trip) as one `MULTI…EXEC` entry with its commands inside.
fn names(commands: &[String]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let mut transaction: Option<Vec<String>> = None;
    for name in commands.iter().map(|c| c.split('"').nth(1).unwrap_or("").to_uppercase()) {
        match (name.as_str(), transaction.as_mut()) {
            ("MULTI", None) => transaction = Some(Vec::new()),
            ("EXEC", Some(_)) => {
                let inside = transaction.take().unwrap_or_default();
                names.push(format!("MULTI {} EXEC", inside.join(" ")));
            }
            (_, Some(inside)) => inside.push(name),
            (_, None) => names.push(name),
        }
    }
    names
}

/// A claim: a transaction, no script.
const CLAIM: &str = "MULTI INCR SET EXEC";

#[tokio::test]
async fn round_trips_first_two_replay_one_in_flight_one() {
    let server = RedisServer::start();
    let layer = IdempotencyLayer::redis(server.pool());
    let (app, gate, calls) = gated(&layer);
    // Warm up: connect and load the scripts.
    send(&app, post(Some("warm-up"), "x")).await;
    let monitor = Monitor::start(&server);

    // The completion is a `SET … IFEQ` where the server takes it.
    let completion = if takes_ifeq(&server) { "SET" } else { "EVALSHA" };
    monitor.take();
    send(&app, post(KEY, "a")).await;
    assert_eq!(names(&monitor.take()), [CLAIM, completion], "first execution: claim, complete");
    assert!(send(&app, post(KEY, "a")).await.replayed());
    assert_eq!(names(&monitor.take()), [CLAIM], "replay: claim");

    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, hold("held")).await }
    });
    gate.entered(1).await;
    monitor.take();
    assert_eq!(send(&app, hold("held")).await.status, 409);
    assert_eq!(names(&monitor.take()), [CLAIM], "in-flight duplicate: claim");
    gate.open(1);
    first.await.unwrap();
    assert_eq!(calls.get(), 3);
}

#[tokio::test]
async fn cluster_round_trips_are_the_same() {
    let cluster = RedisCluster::shared();
    let layer = IdempotencyLayer::redis_cluster(cluster.pool());
    let (app, calls) = counting(&layer);
    // Warm up the node that will serve the measured key: a key whose record
    // lands in the same hash slot (the first 14 bits of its record id).
    let id = |key: &str| tower_idempotency::RecordId::new("", &test_scope(), &key.parse().unwrap());
    let slot = |key: &str| u16::from_be_bytes([id(key).as_bytes()[0], id(key).as_bytes()[1]]) & 0x3fff;
    let measured = "cluster-order";
    let warm = (0..).map(|n| format!("warm-{n}")).find(|key| slot(key) == slot(measured)).unwrap();
    send(&app, post(Some(&warm), "x")).await;
    let before = (cluster.calls("evalsha"), cluster.calls("eval"), cluster.calls("exec"));
    send(&app, post(Some(measured), "cluster")).await;
    assert!(send(&app, post(Some(measured), "cluster")).await.replayed());
    let after = (cluster.calls("evalsha"), cluster.calls("eval"), cluster.calls("exec"));
    // The completion is a `SET … IFEQ`, not a script, where the servers take it.
    let scripts = if takes_ifeq(&cluster.nodes[0]) { 0 } else { 1 };
    assert_eq!(after.0 - before.0, scripts, "complete");
    assert_eq!(after.2 - before.2, 2, "claim, then one claim: transactions");
    assert_eq!(after.1 - before.1, 0, "the scripts were cached on the node");
    assert_eq!(calls.get(), 2);
}

#[tokio::test]
async fn instances_sharing_redis_replay_each_others_records() {
    let server = RedisServer::start();
    // Two app instances: separate pools, separate layers, one Redis.
    let (one, calls_one) = counting(&IdempotencyLayer::redis(server.pool()));
    let (two, calls_two) = counting(&IdempotencyLayer::redis(server.pool()));
    let first = send(&one, post(KEY, "a")).await;
    let replay = send(&two, post(KEY, "a")).await;
    assert!(replay.replayed());
    assert_eq!(
        (replay.status, &replay.body, &replay.headers_but_replayed()),
        (first.status, &first.body, &first.headers)
    );
    assert_eq!((calls_one.get(), calls_two.get()), (1, 0));
}

#[tokio::test]
async fn redis_restart_fails_closed_then_recovers_by_itself() {
    let mut server = RedisServer::start();
    let layer = IdempotencyLayer::redis(server.pool()).with_store_timeout(Duration::from_millis(300)).unwrap();
    let (app, gate, calls) = gated(&layer);
    assert_eq!(send(&app, post(Some("before"), "")).await.status, 201);

    // Redis dies while a request runs: its client still gets the answer.
    let running = tokio::spawn({
        let app = app.clone();
        async move { send(&app, hold("mid-request")).await }
    });
    gate.entered(1).await;
    server.stop();
    gate.open(1);
    assert_eq!(running.await.unwrap().status, 201);

    // While it is down, nothing runs.
    let executed = calls.get();
    let down = send(&app, post(Some("while-down"), "")).await;
    assert_eq!((down.status.as_u16(), down.problem().as_str()), (503, "store-unavailable"));
    assert_eq!(calls.get(), executed);

    // Back up: the layer reconnects without a restart of the app.
    server.restart();
    let mut status = 0;
    for _ in 0..5 {
        status = send(&app, post(Some("after"), "")).await.status.as_u16();
        if status == 201 {
            break;
        }
    }
    assert_eq!(status, 201, "the layer did not recover");
    assert!(send(&app, post(Some("after"), "")).await.replayed());
    assert!(layer.metrics().get(Outcome::StoreError) >= 1);
}

/// A TCP proxy in front of a server that can stop forwarding.
struct StallingProxy {
    port: u16,
    stalled: Arc<AtomicBool>,
}

impl StallingProxy {
    async fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stalled = Arc::new(AtomicBool::new(false));
        let flag = stalled.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else { continue };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pump(client_read, server_write, flag.clone()));
                tokio::spawn(pump(server_read, client_write, flag.clone()));
            }
        });
        Self { port, stalled }
    }

    /// A pool whose connections go through the proxy.
    fn pool(&self) -> deadpool_redis::Pool {
        deadpool_redis::Config::from_url(format!("redis://127.0.0.1:{}", self.port))
            .create_pool(Some(deadpool_redis::Runtime::Tokio1))
            .unwrap()
    }
}

/// Copies bytes one way; while stalled, holds them (the connection stays
/// open, nothing gets through).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    stalled: Arc<AtomicBool>,
) {
    let mut buffer = vec![0; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Bounded: a stall in a test lasts seconds at most.
        for _ in 0..1000 {
            if !stalled.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn a_stalled_connection_hits_the_timeout_and_the_configured_path() {
    let server = RedisServer::start();
    let proxy = StallingProxy::start(server.port).await;
    let pool = proxy.pool();
    let layer = IdempotencyLayer::redis(pool).with_store_timeout(Duration::from_millis(200)).unwrap();
    let (app, calls) = counting(&layer);
    assert_eq!(send(&app, post(Some("k1"), "")).await.status, 201);

    proxy.stalled.store(true, Ordering::SeqCst);
    let stalled = send(&app, post(Some("k2"), "")).await;
    assert_eq!(stalled.status, 503);
    assert_eq!(calls.get(), 1, "nothing ran while the store was stalled");

    let open = IdempotencyLayer::new(layer.store().clone())
        .with_store_timeout(Duration::from_millis(200))
        .unwrap()
        .with_failure_mode(tower_idempotency::FailureMode::FailOpen);
    let (open_app, open_calls) = counting(&open);
    assert_eq!(send(&open_app, post(Some("k3"), "")).await.status, 201);
    assert_eq!((open_calls.get(), open.metrics().get(Outcome::FailedOpen)), (1, 1));

    proxy.stalled.store(false, Ordering::SeqCst);
    let mut status = 0;
    for _ in 0..5 {
        status = send(&app, post(Some("k4"), "")).await.status.as_u16();
        if status == 201 {
            break;
        }
    }
    assert_eq!(status, 201, "the layer did not recover after the stall");
}

#[tokio::test]
async fn a_stale_owner_cannot_overwrite_the_record_of_the_owner_after_it() {
    let server = RedisServer::start();
    // No renewal: the first claim lapses while its handler still runs.
    let lease = Duration::from_millis(300);
    let layer = IdempotencyLayer::redis(server.pool()).with_lease(lease).unwrap().with_lease_ceiling(lease).unwrap();
    let gate = Gate::default();
    let tokens = Arc::new(Mutex::new(Vec::new()));
    let (held, seen) = (gate.clone(), tokens.clone());
    let (app, _) = counted(&layer, move |n, request: HandlerRequest| {
        let context = request.extensions().get::<tower_idempotency::IdempotencyContext>().cloned().unwrap();
        seen.lock().unwrap().push(context.fencing_token());
        let held = held.clone();
        async move {
            if n == 1 {
                held.pass().await;
            }
            respond(201, format!("written by call {n}"))
        }
    });
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post(KEY, "a")).await }
    });
    gate.entered(1).await;
    // Let the first lease run out: this is the fault under test.
    tokio::time::sleep(lease * 3).await;
    let second = send(&app, post(KEY, "a")).await;
    assert_eq!(second.body, "written by call 2");
    gate.open(1);
    assert_eq!(first.await.unwrap().body, "written by call 1");
    let replay = send(&app, post(KEY, "a")).await;
    assert_eq!(
        (&replay.body[..], replay.replayed()),
        (&b"written by call 2"[..], true),
        "the second owner's record stands"
    );
    let tokens = tokens.lock().unwrap().clone();
    assert!(tokens[0] < tokens[1], "the stale owner saw the lower fencing token: {tokens:?}");
    assert_eq!(layer.metrics().get(Outcome::StaleOwner), 1);
}

#[tokio::test]
async fn script_flush_between_calls_is_survived() {
    let server = RedisServer::start();
    let layer = IdempotencyLayer::redis(server.pool());
    let (app, calls) = counting(&layer);
    send(&app, post(Some("a"), "")).await;
    server.command(&["SCRIPT", "FLUSH"]);
    assert!(send(&app, post(Some("a"), "")).await.replayed(), "claim after a flush");
    server.command(&["SCRIPT", "FLUSH"]);
    assert_eq!(send(&app, post(Some("b"), "")).await.status, 201);
    assert!(send(&app, post(Some("b"), "")).await.replayed());
    assert_eq!(calls.get(), 2);
    // Claims and (with IFEQ) completions run no script: renew and release do.
    let store = RedisStore::new(server.pool());
    let id = tower_idempotency::RecordId::from_bytes([5; 32]);
    let request = ClaimRequest::new(id, tower_idempotency::Fingerprint::from_bytes([6; 32]), Duration::from_secs(60));
    let Claim::Acquired(lease) = store.claim(request).await.unwrap() else { panic!("not acquired") };
    server.command(&["SCRIPT", "FLUSH"]);
    store.renew(&id, lease.owner(), Duration::from_secs(60)).await.unwrap();
    server.command(&["SCRIPT", "FLUSH"]);
    store.release(&id, lease.owner()).await.unwrap();
    assert!(store.lookup(&id).await.unwrap().is_none(), "released");
    assert!(server.calls("eval") >= 2, "the scripts were sent again in full");
}

#[tokio::test]
async fn wait_for_replicas_and_fail_when_the_replica_is_down() {
    let primary = RedisServer::start();
    let mut replica = RedisServer::replica_of(&primary);
    let store = RedisStore::new(primary.pool()).with_replicas(1, Duration::from_millis(200));
    let layer = IdempotencyLayer::new(store.clone());
    let (app, calls) = counting(&layer);
    assert_eq!(send(&app, post(Some("replicated"), "")).await.status, 201);
    let key = store.record_key(&tower_idempotency::RecordId::new("", &test_scope(), &"replicated".parse().unwrap()));
    assert!(!replica.command(&["GET", &key]).starts_with("$-1"), "the record reached the replica");

    replica.stop();
    let refused = send(&app, post(Some("unreplicated"), "")).await;
    assert_eq!((refused.status.as_u16(), refused.problem().as_str()), (503, "store-unavailable"));
    assert_eq!(calls.get(), 1, "nothing runs on a claim the replica did not take");
    // The claim was given back: the key is free for a retry.
    let unreplicated =
        store.record_key(&tower_idempotency::RecordId::new("", &test_scope(), &"unreplicated".parse().unwrap()));
    assert!(primary.command(&["GET", &unreplicated]).starts_with("$-1"));
}

#[tokio::test]
async fn waiting_duplicates_block_instead_of_polling() {
    let server = RedisServer::start();
    let layer = IdempotencyLayer::redis(server.pool()).with_in_flight(InFlightPolicy::Wait(Duration::from_secs(20)));
    let (app, gate, calls) = gated(&layer);
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, hold("waited-on")).await }
    });
    gate.entered(1).await;
    let before = server.calls("evalsha") + server.calls("eval");
    let waiters: Vec<_> = (0..8)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { send(&app, hold("waited-on")).await })
        })
        .collect();
    // Hold the first request for a second while eight duplicates wait.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = server.calls("evalsha") + server.calls("eval") - before;
    gate.open(1);
    let first = first.await.unwrap();
    for waiter in waiters {
        let answer = waiter.await.unwrap();
        assert_eq!((&answer.body, answer.replayed()), (&first.body, true));
    }
    assert_eq!(calls.get(), 1);
    // Eight claims, then at most a registration per 200 ms block for the
    // one blocking waiter: a poll loop would be in the thousands.
    assert!(during <= 8 + 8, "{during} script calls in one second of waiting");
    assert!(server.calls("blpop") >= 1);
}

#[tokio::test]
async fn a_completed_1_kib_record_stays_small_in_redis() {
    let server = RedisServer::start();
    let store = RedisStore::new(server.pool());
    let layer = IdempotencyLayer::new(store.clone());
    let app = app(&layer, |_| async { respond(201, vec![b'x'; 1024]) });
    let answer = send(&app, post(KEY, "a")).await;
    let key = store.record_key(&tower_idempotency::RecordId::new("", &test_scope(), &"order-1".parse().unwrap()));
    let usage = |key: &str| -> usize {
        server.command(&["MEMORY", "USAGE", key, "SAMPLES", "0"]).trim_start_matches(':').trim().parse().unwrap()
    };
    let record = usage(&key);
    // The baseline: a bare Redis string holding just the body, under a key
    // name as long as the record's, with a TTL as the record has.
    let bare_key = "b".repeat(key.len());
    server.command(&["SET", &bare_key, &"x".repeat(1024), "PX", "100000"]);
    let bare = usage(&bare_key);
    let headers: usize = answer.headers.iter().map(|(name, value)| name.as_str().len() + value.len()).sum();
    println!(
        "MEMORY USAGE, 1 KiB body: record {record} B (key {} B, headers {headers} B); bare SET of the body {bare} B; \
         record - bare = {} B",
        key.len(),
        record as i64 - bare as i64
    );
    // jemalloc (Redis's allocator) rounds both to the same size class; a
    // server on libc's malloc (the Valkey build the tests use) counts the
    // record's own bytes too: its headers, fingerprint and framing.
    let exact = server.command(&["INFO", "memory"]).contains("mem_allocator:libc");
    let allowed = if exact { headers + 32 + 32 } else { 64 };
    assert!(record <= bare + allowed, "the record costs {record} B, the bare body {bare} B");
}

#[allow(dead_code)]
fn cluster_store_is_nameable(store: RedisClusterStore) -> IdempotencyLayer<RedisClusterStore> {
    IdempotencyLayer::new(store)
}

#[tokio::test]
async fn redis_killed_mid_request_and_back_with_its_data_loses_no_outcome() {
    use tower_idempotency::FailureMode;

    for mode in [FailureMode::FailClosed, FailureMode::FailOpen] {
        // Persistent: every write is fsynced before Redis acknowledges it.
        let mut server = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
        let store = RedisStore::new(server.pool());
        let layer = IdempotencyLayer::new(store.clone())
            .with_failure_mode(mode)
            .with_store_timeout(Duration::from_millis(300))
            .unwrap();
        let (app, gate, calls) = gated(&layer);
        let running = tokio::spawn({
            let app = app.clone();
            async move { send(&app, hold("mid-request")).await }
        });
        gate.entered(1).await;
        server.crash();
        gate.open(1);
        // The handler finished while Redis was down: its client still gets
        // the answer, and the completion is retried in the background.
        let first = running.await.unwrap();
        assert_eq!(first.status, 201, "{mode:?}");

        // While Redis is down, new keys take the configured path.
        let during = send(&app, post(Some("during-outage"), "")).await;
        let expected = if mode == FailureMode::FailClosed { 503 } else { 201 };
        assert_eq!(during.status, expected, "{mode:?}");

        // An outage of a second and a half (the fault under test), then Redis
        // comes back with its data, the claim among it. The completion,
        // retried all along, lands, and a retry of the request gets the
        // replay instead of running a second time.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        server.start_again();
        let waiting = IdempotencyLayer::new(store).with_in_flight(InFlightPolicy::Wait(Duration::from_secs(10)));
        let (retry_app, retry_calls) = counting(&waiting);
        let mut retry = send(&retry_app, hold("mid-request")).await;
        for _ in 0..5 {
            if retry.status != 503 {
                break;
            }
            // The first call after the restart finds the old connection broken.
            retry = send(&retry_app, hold("mid-request")).await;
        }
        assert_eq!((&retry.body, retry.replayed()), (&first.body, true), "{mode:?}");
        assert_eq!(retry_calls.get(), 0, "{mode:?}: the request ran once, before the crash");
        let executed_before_outage = 1;
        let unguarded = usize::from(mode == FailureMode::FailOpen);
        assert_eq!(calls.get(), executed_before_outage + unguarded, "{mode:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_leaks_no_tasks_or_connections() {
    let server = RedisServer::start();
    let proxy = StallingProxy::start(server.port).await;
    let pool = proxy.pool();
    let layer = IdempotencyLayer::redis(pool).with_store_timeout(Duration::from_millis(100)).unwrap();
    let (app, _) = counting(&layer);
    assert_eq!(send(&app, post(Some("warm"), "")).await.status, 201);
    let clients = || -> u64 {
        let info = server.command(&["INFO", "clients"]);
        info.lines().find_map(|l| l.strip_prefix("connected_clients:")).unwrap().trim().parse().unwrap()
    };
    let tasks = || tokio::runtime::Handle::current().metrics().num_alive_tasks();
    let (clients_before, tasks_before) = (clients(), tasks());

    proxy.stalled.store(true, Ordering::SeqCst);
    let stalled: Vec<_> = (0..20)
        .map(|n| {
            let app = app.clone();
            tokio::spawn(async move { send(&app, post(Some(&format!("stalled-{n}")), "")).await.status })
        })
        .collect();
    for request in stalled {
        assert_eq!(request.await.unwrap(), 503);
    }
    proxy.stalled.store(false, Ordering::SeqCst);
    let mut status = 0;
    for _ in 0..10 {
        status = send(&app, post(Some("after"), "")).await.status.as_u16();
        if status == 201 {
            break;
        }
    }
    assert_eq!(status, 201);

    // The claims cut off by the timeout finish on their own and release;
    // then everything is back where it was.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while (clients() > clients_before || tasks() > tasks_before) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(clients() <= clients_before, "Redis connections: {} before, {} after", clients_before, clients());
    assert!(tasks() <= tasks_before, "tasks: {tasks_before} before, {} after", tasks());
}

/// A primary with one replica, an app on the primary (WAIT for `replicas`),
/// and a failover: the primary dies, the replica is promoted, and a second
/// app on it gets the retry. Replication runs through a proxy that holds
/// everything during the request when `lagging`, and never delivers it.
/// Returns the retry's answer and the executions in all.
async fn failover(replicas: u32, lagging: bool) -> (Answer, usize) {
    let mut primary = RedisServer::start();
    let link = StallingProxy::start(primary.port).await;
    let port = link.port;
    let replica = tokio::task::spawn_blocking(move || RedisServer::replica_of_port(port)).await.unwrap();
    let store = RedisStore::new(primary.pool()).with_replicas(replicas, Duration::from_millis(300));
    let (app, calls) = counting(&IdempotencyLayer::new(store));
    link.stalled.store(lagging, Ordering::SeqCst);
    let first = send(&app, post(KEY, "a")).await;
    primary.crash();
    replica.command(&["REPLICAOF", "NO", "ONE"]);
    // The retry reaches an app on the promoted replica.
    let promoted = RedisStore::new(replica.pool());
    let counter = calls.clone();
    let after = app_with(&IdempotencyLayer::new(promoted), counter);
    let retry = send(&after, post(KEY, "a")).await;
    if first.status == 201 && retry.status == 201 && !retry.replayed() {
        assert_ne!(retry.body, first.body, "a second execution");
    }
    (retry, calls.get())
}

/// The counting handler of `common::counting`, on an existing counter.
fn app_with<St: tower_idempotency::Store + Clone>(layer: &IdempotencyLayer<St>, calls: Calls) -> App {
    app(layer, move |_| {
        let n = calls.bump();
        async move { respond(201, format!("{{\"call\":{n}}}")) }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_wait_a_completed_record_survives_failover() {
    let (retry, executions) = failover(1, false).await;
    assert!(retry.replayed(), "the record reached the replica before the client had its answer");
    assert_eq!(executions, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_wait_a_lagging_replica_loses_the_record_and_the_retry_runs_again() {
    // What WAIT protects against: the write was acknowledged by the
    // primary alone, then lost with it.
    let (retry, executions) = failover(0, true).await;
    assert_eq!((retry.status.as_u16(), retry.replayed()), (201, false));
    assert_eq!(executions, 2, "one order, two charges");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_wait_a_lagging_replica_refuses_the_request_instead() {
    let (retry, executions) = failover(1, true).await;
    // The first request was refused (503) before anything ran; the retry on
    // the promoted replica is its first execution.
    assert_eq!((retry.status.as_u16(), retry.replayed()), (201, false));
    assert_eq!(executions, 1);
}

#[tokio::test]
async fn keys_never_reach_redis_key_names() {
    let server = RedisServer::start();
    let layer = IdempotencyLayer::redis(server.pool()).with_in_flight(InFlightPolicy::Wait(Duration::from_secs(5)));
    let (app, _) = counting(&layer);
    for key in ["secret-order-key-42", "\"secret-quoted\"", "SECRET-UPPER"] {
        send(&app, post(Some(key), "a")).await;
        send(&app, post(Some(key), "a")).await;
    }
    let names = server.command(&["KEYS", "*"]).to_lowercase();
    assert!(names.contains("idem:"), "the records are there: {names}");
    assert!(!names.contains("secret"), "a key reached Redis in the clear: {names}");
}

/// Looks the key `k` up (in the tests' scope) until `done` holds of its state,
/// for at most `within`.
async fn state_until<St: tower_idempotency::Store + Clone>(
    layer: &IdempotencyLayer<St>,
    key: &str,
    within: Duration,
    done: impl Fn(&Option<tower_idempotency::store::RecordState>) -> bool,
) -> Option<tower_idempotency::store::RecordState> {
    let (scope, key) = (test_scope(), key.parse().unwrap());
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let state = layer.lookup(&scope, &key).await.ok().flatten();
        if done(&state) || tokio::time::Instant::now() >= deadline {
            return state;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_claim_that_lands_after_the_store_timed_out_is_given_back() {
    let server = RedisServer::start();
    let proxy = StallingProxy::start(server.port).await;
    let pool = proxy.pool();
    // The layer's documented default: one second per store call.
    let layer = IdempotencyLayer::redis(pool);
    let (app, calls) = counting(&layer);
    assert_eq!(send(&app, post(Some("warm"), "")).await.status, 201);

    proxy.stalled.store(true, Ordering::SeqCst);
    let started = std::time::Instant::now();
    let stalled = send(&app, post(Some("k"), "")).await;
    assert_eq!(stalled.status, 503);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "the layer's store timeout applies, not the client library's: 503 after {:?}",
        started.elapsed()
    );
    // Redis comes back: the claim sent during the stall lands now, and is
    // given back right after.
    proxy.stalled.store(false, Ordering::SeqCst);
    let state = state_until(&layer, "k", Duration::from_secs(3), |state| state.is_none()).await;
    assert!(state.is_none(), "the late claim still holds the key: {state:?}");
    let retry = send(&app, post(Some("k"), "")).await;
    assert_eq!((retry.status.as_u16(), retry.replayed()), (201, false));
    assert_eq!(calls.get(), 2);
}

#[tokio::test]
async fn a_completion_refused_for_memory_is_retried_and_the_key_never_runs_twice() {
    let server = RedisServer::start();
    let info = server.command(&["INFO", "memory"]);
    let used: u64 = info
        .lines()
        .find_map(|line| line.strip_prefix("used_memory:"))
        .and_then(|value| value.trim().parse().ok())
        .unwrap();
    server.command(&["CONFIG", "SET", "maxmemory", &(used + 512 * 1024).to_string()]);
    server.command(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    let lease = Duration::from_millis(500);
    let layer = IdempotencyLayer::redis(server.pool()).with_lease(lease).unwrap();
    let filler = server.port;
    let (app, calls) = counted(&layer, move |_, _| async move {
        // Another writer takes Redis past `maxmemory` while this one runs.
        command_on(filler, &["SETRANGE", "filler", "1048576", "x"]).unwrap();
        respond(201, vec![b'x'; 64 * 1024])
    });
    let first = send(&app, post(KEY, "a")).await;
    assert_eq!(first.status, 201);
    // Three leases while Redis refuses writes: the claim is kept alive.
    tokio::time::sleep(lease * 3).await;
    server.command(&["DEL", "filler"]);
    let completed = |state: &Option<tower_idempotency::store::RecordState>| {
        matches!(state, Some(tower_idempotency::store::RecordState::Completed(_)))
    };
    let state = state_until(&layer, "order-1", Duration::from_secs(5), completed).await;
    assert!(completed(&state), "the completion was never retried: {state:?}");
    let retry = send(&app, post(KEY, "a")).await;
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    assert_eq!(calls.get(), 1);
    assert!(layer.metrics().get(Outcome::StoreError) >= 1, "the refused completion is counted");
}

/// A primary and a replica fed through a proxy that can hold replication.
async fn primary_with_stallable_replica() -> (RedisServer, StallingProxy, RedisServer) {
    let primary = RedisServer::start();
    let link = StallingProxy::start(primary.port).await;
    let port = link.port;
    let replica = tokio::task::spawn_blocking(move || RedisServer::replica_of_port(port)).await.unwrap();
    (primary, link, replica)
}

/// Waits (bounded) until the server has `n` clients blocked, as in `WAIT`.
async fn blocked_clients(server: &RedisServer, n: u32) {
    for _ in 0..200 {
        let info = server.command(&["INFO", "clients"]);
        let blocked: u32 = info
            .lines()
            .find_map(|line| line.strip_prefix("blocked_clients:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if blocked >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no client blocked on the server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_replica_holds_up_only_the_writes_that_wait_for_it() {
    let (primary, link, _replica) = primary_with_stallable_replica().await;
    let store = RedisStore::new(primary.pool()).with_replicas(1, Duration::from_secs(3));
    let layer = IdempotencyLayer::new(store);
    let (app, calls) = counting(&layer);
    let done = send(&app, post(Some("done"), "")).await;
    assert_eq!(done.status, 201);

    link.stalled.store(true, Ordering::SeqCst);
    // A first execution: its claim waits for the stalled replica.
    let waiting = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post(Some("new"), "")).await }
    });
    blocked_clients(&primary, 1).await;
    // A replay writes nothing: it waits for no replica, and no other call's
    // WAIT holds it up.
    let replay = send(&app, post(Some("done"), "")).await;
    assert!(replay.replayed(), "a replay while a replica lags: {}", replay.status);
    assert_eq!(replay.body, done.body);
    let waiting = waiting.await.unwrap();
    assert_eq!((waiting.status.as_u16(), waiting.problem().as_str()), (503, "store-unavailable"));
    link.stalled.store(false, Ordering::SeqCst);
    assert_eq!(calls.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_whose_wait_failed_waits_again_instead_of_reading_as_a_stale_owner() {
    let (primary, link, replica) = primary_with_stallable_replica().await;
    let store = RedisStore::new(primary.pool()).with_replicas(1, Duration::from_millis(200));
    let layer = IdempotencyLayer::new(store.clone());
    let stall = link.stalled.clone();
    let (app, calls) = counted(&layer, move |_, _| {
        // Replication stalls while the handler runs: its completion's WAIT fails.
        stall.store(true, Ordering::SeqCst);
        async { respond(201, "charged") }
    });
    let first = send(&app, post(KEY, "a")).await;
    assert_eq!(first.status, 201);
    // Replication stays held for half a second: the completion is retried
    // meanwhile.
    tokio::time::sleep(Duration::from_millis(500)).await;
    link.stalled.store(false, Ordering::SeqCst);
    let key = store.record_key(&tower_idempotency::RecordId::new("", &test_scope(), &"order-1".parse().unwrap()));
    for _ in 0..200 {
        if !replica.command(&["GET", &key]).starts_with("$-1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The retried completion recognised its own record and waited again.
    let metrics = layer.metrics();
    assert!(metrics.get(Outcome::StoreError) >= 1, "the failed WAIT is counted");
    assert_eq!(metrics.get(Outcome::StaleOwner), 0, "the retry took its own record for another owner's");
    assert!(send(&app, post(KEY, "a")).await.replayed());
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn check_tells_a_reachable_store_from_a_wrong_url() {
    let server = RedisServer::start();
    IdempotencyLayer::redis(server.pool()).check().await.expect("a running Redis");
    let nowhere = deadpool_redis::Config::from_url("redis://127.0.0.1:1")
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .unwrap();
    let error = IdempotencyLayer::redis(nowhere).check().await.unwrap_err();
    assert!(
        matches!(
            error,
            tower_idempotency::store::StoreError::Unavailable(_) | tower_idempotency::store::StoreError::Timeout(_)
        ),
        "{error}"
    );
}

/// Whether `server` takes `SET … IFEQ`: Valkey 8.1 and later, Redis 8.4
/// and later (by the version its `INFO server` reports).
fn takes_ifeq(server: &RedisServer) -> bool {
    let info = server.command(&["INFO", "server"]);
    let version = |name: &str| -> Option<(u32, u32)> {
        let value = info.lines().find_map(|line| line.strip_prefix(name))?.trim();
        let mut parts = value.split('.').map(|part| part.parse().unwrap_or(0));
        Some((parts.next()?, parts.next()?))
    };
    match version("valkey_version:") {
        Some(valkey) => valkey >= (8, 1),
        None => version("redis_version:").is_some_and(|redis| redis >= (8, 4)),
    }
}

#[tokio::test]
async fn completions_run_no_script_where_the_server_takes_set_ifeq() {
    let server = RedisServer::start();
    let layer = IdempotencyLayer::redis(server.pool());
    let (app, calls) = counting(&layer);
    let scripts = || server.calls("evalsha") + server.calls("eval");
    // Loads the scripts (a first `EVALSHA` fails and is sent again as `EVAL`).
    assert_eq!(send(&app, post(Some("warm-up"), "a")).await.status, 201);
    let before = scripts();
    for n in 0..5 {
        let key: &'static str = Box::leak(format!("order-{n}").into_boxed_str());
        assert_eq!(send(&app, post(Some(key), "a")).await.status, 201);
        assert!(send(&app, post(Some(key), "a")).await.replayed());
    }
    assert_eq!(calls.get(), 6);
    // Five first executions and five replays: claims are transactions, and
    // a completion is a script where IFEQ is missing (after the one try).
    let expected = if takes_ifeq(&server) { 0 } else { 5 };
    assert_eq!(
        scripts() - before,
        expected,
        "script calls on a server {} IFEQ",
        if expected == 0 { "with" } else { "without" }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_with_waiters_wakes_them_where_the_server_takes_set_ifeq() {
    let server = RedisServer::start();
    let layer = IdempotencyLayer::redis(server.pool()).with_in_flight(InFlightPolicy::Wait(Duration::from_secs(10)));
    let (app, gate, calls) = gated(&layer);
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, hold("k")).await }
    });
    gate.entered(1).await;
    let waiter = tokio::spawn({
        let app = app.clone();
        async move { send(&app, hold("k")).await }
    });
    // The waiter counted itself in the in-flight value: the completion's
    // IFEQ misses, and the script completes and wakes it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while server.calls("blpop") == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the waiter never blocked");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let woken_at = tokio::time::Instant::now();
    gate.open(1);
    let first = first.await.unwrap();
    let waiter = waiter.await.unwrap();
    assert!(waiter.replayed());
    assert_eq!(waiter.body, first.body);
    assert!(woken_at.elapsed() < Duration::from_secs(2), "the waiter was not woken");
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn without_fencing_tokens_a_claim_is_one_set_and_a_stale_owner_changes_nothing() {
    let server = RedisServer::start();
    let store = RedisStore::new(server.pool());
    let id = tower_idempotency::RecordId::from_bytes([3; 32]);
    let fingerprint = tower_idempotency::Fingerprint::from_bytes([4; 32]);
    let request = ClaimRequest::new(id, fingerprint, Duration::from_millis(100)).with_fencing_token(false);
    let scripts = || server.calls("evalsha") + server.calls("eval");
    let Claim::Acquired(stale) = store.claim(request).await.unwrap() else { panic!("not acquired") };
    assert_eq!(stale.fencing_token().get(), 0);
    assert_eq!(scripts(), 0, "the claim ran a script");
    // Its lease runs out; another claim takes the key.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let current = loop {
        match store.claim(request).await.unwrap() {
            Claim::Acquired(lease) => break lease,
            _ => {
                assert!(tokio::time::Instant::now() < deadline, "the lease never ran out");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let record = |n: u8| {
        tower_idempotency::Record::new(
            fingerprint,
            tower_idempotency::StoredResponse::new(http::StatusCode::OK, http::HeaderMap::new(), vec![n].into(), None),
        )
    };
    let stale_completion = store.complete(&id, stale.owner(), record(1), Duration::from_secs(60)).await;
    assert!(matches!(stale_completion, Err(StoreError::NotOwner)), "{stale_completion:?}");
    assert!(matches!(store.release(&id, stale.owner()).await, Err(StoreError::NotOwner)));
    store.complete(&id, current.owner(), record(2), Duration::from_secs(60)).await.unwrap();
    match store.lookup(&id).await.unwrap() {
        Some(RecordState::Completed(record)) => assert_eq!(&record.response().unwrap().body()[..], [2]),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_layer_without_fencing_tokens_claims_with_no_script_and_hands_out_token_zero() {
    let server = RedisServer::start();
    let layer = IdempotencyLayer::redis(server.pool()).with_fencing_tokens(false);
    let tokens = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = tokens.clone();
    let app = app(&layer, move |request: HandlerRequest| {
        let context = request.extensions().get::<tower_idempotency::IdempotencyContext>().cloned();
        seen.lock().unwrap().push(context.map(|context| context.fencing_token().get()));
        async { respond(201, "charged") }
    });
    assert_eq!(send(&app, post(Some("warm-up"), "a")).await.status, 201);
    let scripts = || server.calls("evalsha") + server.calls("eval");
    let before = scripts();
    assert_eq!(send(&app, post(KEY, "a")).await.status, 201);
    assert!(send(&app, post(KEY, "a")).await.replayed());
    assert_eq!(send(&app, post(KEY, "b")).await.status, 422);
    // No script for the claims; the completion is one where IFEQ is missing.
    let expected = if takes_ifeq(&server) { 0 } else { 1 };
    assert_eq!(scripts() - before, expected);
    assert_eq!(*tokens.lock().unwrap(), [Some(0), Some(0)]);
}

/// A proxy in front of `target` that loses the reply to the first command
/// carrying `NX` that it forwards: it closes that client connection instead
/// of passing the reply on. Other connections and commands pass.
async fn losing_the_reply_to_nx(target: u16) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let armed = Arc::new(AtomicBool::new(true));
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else { continue };
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            let lose = Arc::new(AtomicBool::new(false));
            let (armed, lose_up, lose_down) = (armed.clone(), lose.clone(), lose);
            tokio::spawn(async move {
                let mut buffer = vec![0; 16 * 1024];
                while let Ok(n @ 1..) = client_read.read(&mut buffer).await {
                    if buffer[..n].windows(4).any(|w| w == b"\r\nNX") && armed.swap(false, Ordering::SeqCst) {
                        lose_up.store(true, Ordering::SeqCst);
                    }
                    if server_write.write_all(&buffer[..n]).await.is_err() {
                        return;
                    }
                }
            });
            tokio::spawn(async move {
                let mut buffer = vec![0; 16 * 1024];
                while let Ok(n @ 1..) = server_read.read(&mut buffer).await {
                    if lose_down.load(Ordering::SeqCst) {
                        return; // drops the client's side: the reply is lost
                    }
                    if client_write.write_all(&buffer[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn a_claim_without_fencing_token_whose_reply_is_lost_is_given_back() {
    let server = RedisServer::start();
    let port = losing_the_reply_to_nx(server.port).await;
    let pool = deadpool_redis::Config::from_url(format!("redis://127.0.0.1:{port}"))
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .unwrap();
    let store = RedisStore::new(pool);
    let id = tower_idempotency::RecordId::from_bytes([6; 32]);
    let request = ClaimRequest::new(id, tower_idempotency::Fingerprint::from_bytes([1; 32]), Duration::from_secs(600))
        .with_fencing_token(false);
    assert!(store.claim(request).await.is_err(), "the reply was lost");
    // The claim landed; the store gave it back rather than leave the key
    // in flight for its ten-minute lease.
    let key = store.record_key(&id);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while server.command(&["EXISTS", &key]).contains(":1") {
        assert!(tokio::time::Instant::now() < deadline, "the lost claim still holds its key");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(matches!(store.claim(request).await.unwrap(), Claim::Acquired(_)));
}

#[tokio::test]
async fn a_claim_is_a_transaction_and_leaves_its_token_to_its_owner() {
    let store = RedisStore::new(shared_server().pool());
    let id = tower_idempotency::RecordId::from_bytes([7; 32]);
    let fingerprint = tower_idempotency::Fingerprint::from_bytes([8; 32]);
    let request = ClaimRequest::new(id, fingerprint, Duration::from_secs(60));
    let Claim::Acquired(lease) = store.claim(request).await.unwrap() else { panic!("not acquired") };
    assert!(lease.fencing_token().get() > 0, "the owner has its token");
    match store.lookup(&id).await.unwrap() {
        Some(RecordState::InFlight { fingerprint: seen, fencing_token }) => {
            assert_eq!((seen, fencing_token), (Some(fingerprint), None));
        }
        other => panic!("expected in flight, got {other:?}"),
    }
    store.release(&id, lease.owner()).await.unwrap();
}

/// An error inside the claim's `EXEC` (here the fencing counter holds no
/// integer) comes after `SET … NX GET` may have run: the claim is given
/// back, not left holding the key for a lease on nobody's behalf.
#[tokio::test]
async fn a_claim_whose_transaction_fails_inside_exec_leaves_the_key_free() {
    let server = RedisServer::start();
    let store = RedisStore::new(server.pool());
    let id = tower_idempotency::RecordId::from_bytes([0x42; 32]);
    let key = store.record_key(&id);
    let fence = format!("{}:fence", key.rsplit_once(':').unwrap().0);
    server.command(&["SET", &fence, "not-a-number"]);
    let request = ClaimRequest::new(id, tower_idempotency::Fingerprint::from_bytes([1; 32]), Duration::from_secs(30));
    assert!(store.claim(request).await.is_err(), "a claim without a fencing token must fail");
    assert_eq!(server.command(&["EXISTS", &key]).trim(), ":0", "the failed claim still holds the key");
    server.command(&["DEL", &fence]);
    assert!(matches!(store.claim(request).await, Ok(Claim::Acquired(_))));
}

/// Same-length replacements: (to the server, to the client).
type Rules = (Vec<(Vec<u8>, Vec<u8>)>, Vec<(Vec<u8>, Vec<u8>)>);

/// A TCP proxy in front of a server that rewrites bytes on their way, each
/// rule one same-length replacement (so RESP lengths stay right), while
/// its rules are on; `cut` closes every connection made so far.
struct RewritingProxy {
    port: u16,
    rules: Arc<Mutex<Rules>>,
    connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl RewritingProxy {
    async fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let rules: Arc<Mutex<Rules>> = Arc::default();
        let connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (shared, tasks) = (rules.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else { continue };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                let mut tasks = tasks.lock().unwrap();
                tasks.push(tokio::spawn(rewrite(client_read, server_write, shared.clone(), true)));
                tasks.push(tokio::spawn(rewrite(server_read, client_write, shared.clone(), false)));
            }
        });
        Self { port, rules, connections }
    }

    fn rewrite(&self, to_server: &[(&str, &str)], to_client: &[(&str, &str)]) {
        let owned = |rules: &[(&str, &str)]| {
            rules.iter().map(|(from, to)| (from.as_bytes().to_vec(), to.as_bytes().to_vec())).collect()
        };
        *self.rules.lock().unwrap() = (owned(to_server), owned(to_client));
    }

    fn cut(&self) {
        self.connections.lock().unwrap().drain(..).for_each(|task| task.abort());
    }

    fn pool(&self) -> deadpool_redis::Pool {
        deadpool_redis::Config::from_url(format!("redis://127.0.0.1:{}", self.port))
            .create_pool(Some(deadpool_redis::Runtime::Tokio1))
            .unwrap()
    }
}

async fn rewrite(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    rules: Arc<Mutex<Rules>>,
    to_server: bool,
) {
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        {
            let rules = rules.lock().unwrap();
            let rules = if to_server { &rules.0 } else { &rules.1 };
            for (pattern, replacement) in rules {
                let mut at = 0;
                while let Some(found) = buffer[at..n].windows(pattern.len()).position(|window| window == &pattern[..]) {
                    buffer[at + found..at + found + pattern.len()].copy_from_slice(replacement);
                    at += found + pattern.len();
                }
            }
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

/// A server that reports a version before 7.0 refuses `SET … NX GET`:
/// the store learns the version on connecting and claims with the claim
/// script instead, and a request still runs once and replays.
#[tokio::test]
async fn on_a_server_older_than_7_claims_run_the_claim_script() {
    let server = RedisServer::start();
    let proxy = RewritingProxy::start(server.port).await;
    // Redis 6.2's INFO, as far as the store reads it (same length).
    proxy.rewrite(&[], &[("redis_version:7", "redis_version:6"), ("redis_version:8", "redis_version:6")]);
    let layer = IdempotencyLayer::redis(proxy.pool());
    layer.check().await.unwrap();
    let (app, calls) = counting(&layer);
    let transactions = || server.calls("multi");
    let scripts = || server.calls("evalsha") + server.calls("eval");
    let before = (transactions(), scripts());
    assert_eq!(send(&app, post(KEY, "a")).await.status, 201);
    assert!(send(&app, post(KEY, "a")).await.replayed());
    assert_eq!(calls.get(), 1);
    assert_eq!(transactions(), before.0, "a claim sent SET NX GET in a transaction");
    assert!(scripts() >= before.1 + 2, "both claims run the claim script");
}

/// Whether the server takes `SET … IFEQ` is learned per connection: a
/// server that refused it once (here through a proxy that spoils the
/// option) is asked again after the store reconnects, to a server that
/// takes it (an upgrade, a failover).
#[tokio::test]
async fn set_ifeq_is_tried_again_on_a_new_connection() {
    let server = RedisServer::start();
    if !takes_ifeq(&server) {
        eprintln!("this server takes no SET IFEQ: nothing to show");
        return;
    }
    let proxy = RewritingProxy::start(server.port).await;
    proxy.rewrite(&[("$4\r\nIFEQ\r\n", "$4\r\nIFXQ\r\n")], &[]);
    let layer = IdempotencyLayer::redis(proxy.pool());
    let (app, _) = counting(&layer);
    let scripts = || server.calls("evalsha") + server.calls("eval");
    assert_eq!(send(&app, post(Some("before"), "a")).await.status, 201);
    assert!(server.calls("set") >= 1);
    proxy.rewrite(&[], &[]);
    proxy.cut();
    // The first call after the cut finds the connection broken.
    for n in 0..20 {
        if send(&app, post(Some(Box::leak(format!("reconnect-{n}").into_boxed_str())), "a")).await.status == 201 {
            break;
        }
    }
    let before = scripts();
    for n in 0..3 {
        let key: &'static str = Box::leak(format!("after-{n}").into_boxed_str());
        assert_eq!(send(&app, post(Some(key), "a")).await.status, 201);
    }
    assert_eq!(scripts(), before, "completions on the new connection ran scripts: IFEQ was never asked again");
}
