//! Throwaway `redis-server` processes on free loopback ports: a single
//! server, a primary with a replica, and a three-node cluster.
//!
//! `TEST_REDIS_SERVER` and `TEST_REDIS_CLI` name other binaries to run
//! instead of `redis-server` and `redis-cli` (`.ci/run` runs the Redis
//! suites again on Valkey 8.1 that way).
//!
//! Every server runs under a small `sh` watchdog that kills it when the test
//! process's end of a pipe closes: on drop, on a failed test, and even when
//! the test process is killed outright. Nothing here touches port 6379.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use tower_idempotency::store::redis::deadpool_redis;

pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    process: Option<(Child, ChildStdin)>,
}

/// The server binary: `TEST_REDIS_SERVER`, else `redis-server`.
pub fn server_binary() -> String {
    std::env::var("TEST_REDIS_SERVER").ok().filter(|path| !path.is_empty()).unwrap_or_else(|| "redis-server".into())
}

/// The command-line client: `TEST_REDIS_CLI`, else `redis-cli`.
pub fn cli_binary() -> String {
    std::env::var("TEST_REDIS_CLI").ok().filter(|path| !path.is_empty()).unwrap_or_else(|| "redis-cli".into())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn scratch_dir() -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tower-idempotency-redis-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl RedisServer {
    /// A fresh server on a free port.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A fresh server with extra `redis-server` arguments.
    pub fn start_with(extra: &[&str]) -> Self {
        for _ in 0..5 {
            let mut server = Self {
                port: free_port(),
                dir: scratch_dir(),
                extra: extra.iter().map(|s| s.to_string()).collect(),
                process: None,
            };
            if server.spawn() {
                return server;
            }
        }
        panic!("{} did not start (is it installed?)", server_binary());
    }

    /// A replica of `primary`.
    pub fn replica_of(primary: &RedisServer) -> Self {
        Self::replica_of_port(primary.port)
    }

    /// A replica of whatever listens on `port` (a primary, or a proxy in
    /// front of one).
    pub fn replica_of_port(port: u16) -> Self {
        let port = port.to_string();
        let replica = Self::start_with(&["--replicaof", "127.0.0.1", &port]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !replica.command(&["INFO", "replication"]).contains("master_link_status:up") {
            assert!(Instant::now() < deadline, "the replica never synced");
            std::thread::sleep(Duration::from_millis(20));
        }
        replica
    }

    /// Starts the process; false when it did not come up (port taken).
    fn spawn(&mut self) -> bool {
        let mut args: Vec<String> = vec![
            "--port".into(),
            self.port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            "".into(),
            "--appendonly".into(),
            "no".into(),
            "--dir".into(),
            self.dir.display().to_string(),
            "--logfile".into(),
            self.dir.join("redis.log").display().to_string(),
        ];
        args.extend(self.extra.iter().cloned());
        // The watchdog: runs redis-server, and kills it once stdin closes.
        // It also removes the scratch directory, which statics never drop,
        // unless a crash asked to keep the data for a start again.
        std::fs::create_dir_all(&self.dir).unwrap();
        let script = r#""$SERVER" "$@" & pid=$!; read _unused; kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null;
            if [ -e "$SCRATCH/keep" ]; then rm -f "$SCRATCH/keep"; else rm -rf "$SCRATCH"; fi"#;
        let mut child = Command::new("sh")
            .env("SCRATCH", &self.dir)
            .env("SERVER", server_binary())
            .arg("-c")
            .arg(script)
            .arg("sh")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sh");
        let stdin = child.stdin.take().expect("piped stdin");
        self.process = Some((child, stdin));
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.try_command(&["PING"]).is_some_and(|reply| reply.contains("PONG")) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.stop();
        false
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pool(&self) -> deadpool_redis::Pool {
        deadpool_redis::Config::from_url(self.url()).create_pool(Some(deadpool_redis::Runtime::Tokio1)).unwrap()
    }

    /// Kills the server (as a crash would), keeping its port.
    pub fn stop(&mut self) {
        if let Some((mut child, stdin)) = self.process.take() {
            drop(stdin);
            let _ = child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the server with SIGKILL, keeping its data directory (and so
    /// its append-only file, for a server started with one).
    pub fn crash(&mut self) {
        std::fs::write(self.dir.join("keep"), b"").unwrap();
        self.stop();
    }

    /// Starts a crashed server again on its port, from its data.
    pub fn start_again(&mut self) {
        assert!(self.spawn(), "redis-server did not start again on port {}", self.port);
    }

    /// Starts the server again on the same port, empty.
    pub fn restart(&mut self) {
        self.stop();
        assert!(self.spawn(), "redis-server did not restart on port {}", self.port);
    }

    /// Runs one command and returns the raw RESP reply, panicking on failure.
    pub fn command(&self, args: &[&str]) -> String {
        self.try_command(args).unwrap_or_else(|| panic!("{args:?} on port {} got no reply", self.port))
    }

    /// Runs one command over a raw connection and returns the RESP reply.
    pub fn try_command(&self, args: &[&str]) -> Option<String> {
        command_on(self.port, args)
    }

    /// The number of calls of `command` in `INFO commandstats`.
    pub fn calls(&self, command: &str) -> u64 {
        let stats = self.command(&["INFO", "commandstats"]);
        let prefix = format!("cmdstat_{}:calls=", command.to_lowercase());
        stats
            .lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0)
    }
}

/// Runs one command on the server at `port` over a raw connection and
/// returns the RESP reply (blocking: for test setup, or a handler's side
/// write).
pub fn command_on(port: u16, args: &[&str]) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.write_all(request.as_bytes()).ok()?;
    let mut reply = Vec::new();
    let mut buffer = [0; 65536];
    loop {
        let n = stream.read(&mut buffer).ok()?;
        reply.extend_from_slice(&buffer[..n]);
        if n == 0 || resp_complete(&reply) {
            break;
        }
    }
    Some(String::from_utf8_lossy(&reply).into_owned())
}

/// Whether `reply` holds one whole RESP value (enough for what tests send).
fn resp_complete(reply: &[u8]) -> bool {
    fn value(input: &[u8]) -> Option<usize> {
        let line_end = input.windows(2).position(|w| w == b"\r\n")?;
        let head = std::str::from_utf8(&input[1..line_end]).ok()?;
        let rest = line_end + 2;
        match input.first()? {
            b'+' | b'-' | b':' => Some(rest),
            b'$' => {
                let len: i64 = head.parse().ok()?;
                if len < 0 {
                    return Some(rest);
                }
                let end = rest + len as usize + 2;
                (input.len() >= end).then_some(end)
            }
            b'*' => {
                let count: i64 = head.parse().ok()?;
                let mut at = rest;
                for _ in 0..count.max(0) {
                    at += value(&input[at..])?;
                }
                Some(at)
            }
            _ => None,
        }
    }
    value(reply).is_some()
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Three primaries, no replicas, slots spread by `redis-cli --cluster create`.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        let mut create = Command::new(cli_binary());
        create.arg("--cluster").arg("create");
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let output =
            create.args(["--cluster-replicas", "0", "--cluster-yes"]).stdin(Stdio::null()).output().expect("redis-cli");
        assert!(output.status.success(), "cluster create failed: {}", String::from_utf8_lossy(&output.stdout));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !nodes.iter().all(|node| node.command(&["CLUSTER", "INFO"]).contains("cluster_state:ok")) {
            assert!(Instant::now() < deadline, "the cluster never became ok");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { nodes }
    }

    /// One cluster for the whole test binary; its servers die with it.
    pub fn shared() -> &'static RedisCluster {
        static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
        CLUSTER.get_or_init(RedisCluster::start)
    }

    pub fn pool(&self) -> deadpool_redis::cluster::Pool {
        let urls: Vec<String> = self.nodes.iter().map(RedisServer::url).collect();
        deadpool_redis::cluster::Config::from_urls(urls).create_pool(Some(deadpool_redis::Runtime::Tokio1)).unwrap()
    }

    /// Calls of `command` summed over the nodes.
    pub fn calls(&self, command: &str) -> u64 {
        self.nodes.iter().map(|node| node.calls(command)).sum()
    }
}

/// One single server for the whole test binary; it dies with it.
pub fn shared_server() -> &'static RedisServer {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER.get_or_init(RedisServer::start)
}
