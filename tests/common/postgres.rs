//! A database of its own per test on the PostgreSQL this machine runs
//! (`DATABASE_URL`, else `postgres://postgres@127.0.0.1:5432/postgres`),
//! dropped when the test ends.

use std::sync::atomic::{AtomicU32, Ordering};

use tower_idempotency::store::postgres::sqlx::{self, Connection, PgConnection, PgPool};

fn server_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
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
}

impl TestDatabase {
    /// The database's URL, for another process.
    pub fn url(&self) -> String {
        url_of(&self.name)
    }

    pub async fn create() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!("tower_idempotency_test_{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let mut admin = PgConnection::connect(&server_url()).await.expect("PostgreSQL on 127.0.0.1:5432 (see README)");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await.unwrap();
        let pool = PgPool::connect(&url_of(&name)).await.unwrap();
        Self { name, pool }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
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
