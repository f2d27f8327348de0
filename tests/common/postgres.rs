//! A database of its own per test on the PostgreSQL this machine runs
//! (`DATABASE_URL`, else `postgres://postgres@127.0.0.1:5432/postgres`),
//! dropped when the test ends. With `TEST_POSTGRES_POOLER=pgbouncer` the
//! test's pool (and `url()`) goes through a PgBouncer of its own in
//! transaction mode.

use std::sync::atomic::{AtomicU32, Ordering};

use tower_idempotency::store::postgres::sqlx::{self, Connection, PgConnection, PgPool};

fn server_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// The host and port of `server_url`.
pub fn server_host_port() -> (String, u16) {
    let url = server_url();
    let authority = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
    let authority = authority.split(['/', '?']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    match host_port.rsplit_once(':') {
        Some((host, port)) => (host.to_owned(), port.parse().unwrap_or(5432)),
        None => (host_port.to_owned(), 5432),
    }
}

/// `server_url` with its database replaced by `database`.
fn url_of(database: &str) -> String {
    let url = server_url();
    let base = url.rsplit_once('/').map_or(url.as_str(), |(base, _)| base);
    format!("{base}/{database}")
}

pub struct TestDatabase {
    pub name: String,
    pub pool: PgPool,
    /// The PgBouncer in front of the database, under `TEST_POSTGRES_POOLER`.
    pub bouncer: Option<super::pgbouncer::PgBouncer>,
}

/// Whether the tests run through PgBouncer (`TEST_POSTGRES_POOLER=pgbouncer`).
pub fn through_pgbouncer() -> bool {
    std::env::var("TEST_POSTGRES_POOLER").is_ok_and(|pooler| pooler == "pgbouncer")
}

impl TestDatabase {
    /// The database's URL, for another process or pool (through the
    /// test's PgBouncer, if any).
    pub fn url(&self) -> String {
        match &self.bouncer {
            Some(bouncer) => bouncer.url(self),
            None => url_of(&self.name),
        }
    }

    /// A `PostgresStore` on the test's pool; behind PgBouncer, its waiters
    /// listen on a connection straight to the database.
    pub fn plain_store(&self) -> tower_idempotency::store::postgres::PostgresStore {
        let store = tower_idempotency::store::postgres::PostgresStore::new(self.pool.clone());
        match &self.bouncer {
            Some(_) => store.with_listen_url(Some(&self.direct_url())),
            None => store,
        }
    }

    /// The database's URL on the server itself, past any pooler.
    pub fn direct_url(&self) -> String {
        url_of(&self.name)
    }

    pub async fn create() -> Self {
        Self::create_with(&[]).await
    }

    /// A database whose sessions take `settings` (name, value) by default,
    /// set before anything connects to it.
    pub async fn create_with(settings: &[(&str, &str)]) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!("tower_idempotency_test_{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let mut admin = PgConnection::connect(&server_url()).await.expect("PostgreSQL on 127.0.0.1:5432 (see README)");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await.unwrap();
        for (setting, value) in settings {
            let alter = format!("ALTER DATABASE {name} SET {setting} = '{value}'");
            sqlx::raw_sql(sqlx::AssertSqlSafe(alter)).execute(&mut admin).await.unwrap();
        }
        let bouncer = through_pgbouncer().then(|| super::pgbouncer::PgBouncer::start(20));
        let url = match &bouncer {
            Some(bouncer) => bouncer.url_of(&name),
            None => url_of(&name),
        };
        let pool = PgPool::connect(&url).await.unwrap();
        Self { name, pool, bouncer }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // PgBouncer first: its server connections would hold the database.
        drop(self.bouncer.take());
        let name = self.name.clone();
        // On a thread of its own: Drop cannot wait on the test's runtime.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let mut admin = PgConnection::connect(&server_url()).await?;
                let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                sqlx::raw_sql(sqlx::AssertSqlSafe(drop)).execute(&mut admin).await.map(drop_value)
            })
        });
        let _ = dropped.join();
    }
}

fn drop_value<T>(_: T) {}
