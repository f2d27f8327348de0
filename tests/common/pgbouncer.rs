//! A PgBouncer of the test's own in `pool_mode = transaction`, in front of
//! the PostgreSQL the tests use (`DATABASE_URL`, else 127.0.0.1:5432),
//! stopped when dropped. `pgbouncer` is on PATH or in `/usr/sbin` (Debian's
//! package); it refuses to run as root, so a root test runs it as `postgres`.

use std::{
    io::Write,
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::postgres::TestDatabase;

pub struct PgBouncer {
    process: Child,
    port: u16,
    dir: PathBuf,
}

fn binary() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("pgbouncer"))
        .find(|path| path.is_file());
    on_path.unwrap_or_else(|| PathBuf::from("/usr/sbin/pgbouncer"))
}

fn running_as_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|out| out.stdout.trim_ascii() == b"0")
}

impl PgBouncer {
    /// A PgBouncer in transaction mode with `pool_size` server connections
    /// per database, listening on a free loopback port.
    pub fn start(pool_size: u32) -> Self {
        let (host, port) = super::postgres::server_host_port();
        let dir = std::env::temp_dir().join(format!("tower-idempotency-pgbouncer-{}-{}", std::process::id(), next()));
        std::fs::create_dir_all(&dir).unwrap();
        let listen = {
            // Released before PgBouncer binds it: a race with another process
            // is possible but unlikely on a test machine.
            let probe = TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        std::fs::write(dir.join("users.txt"), "\"postgres\" \"\"\n").unwrap();
        let config = format!(
            "[databases]\n* = host={host} port={port} user=postgres\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\n\
             listen_port = {listen}\nunix_socket_dir =\nauth_type = trust\nauth_file = {dir}/users.txt\n\
             pool_mode = transaction\ndefault_pool_size = {pool_size}\nmax_client_conn = 500\n\
             ignore_startup_parameters = extra_float_digits,options,search_path\nlogfile = {dir}/pgbouncer.log\n\
             pidfile = {dir}/pgbouncer.pid\nserver_reset_query =\n",
            dir = dir.display()
        );
        std::fs::File::create(dir.join("pgbouncer.ini")).unwrap().write_all(config.as_bytes()).unwrap();
        let mut command = Command::new(binary());
        if running_as_root() {
            // The postgres user must read the config and write the log.
            Command::new("chown").args(["-R", "postgres"]).arg(&dir).status().unwrap();
            command.args(["-u", "postgres"]);
        }
        let process = command
            .arg(dir.join("pgbouncer.ini"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pgbouncer (apt-get install pgbouncer)");
        let bouncer = Self { process, port: listen, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", listen)).is_err() {
            assert!(Instant::now() < deadline, "pgbouncer did not listen: {}", bouncer.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        bouncer
    }

    /// The URL of `database` through this PgBouncer, with sqlx's statement
    /// cache off (PgBouncer 1.18 keeps no prepared statements across
    /// transactions).
    pub fn url(&self, database: &TestDatabase) -> String {
        self.url_of(&database.name)
    }

    /// The URL of the database named `database` through this PgBouncer.
    pub fn url_of(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}?statement-cache-capacity=0", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

fn next() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
