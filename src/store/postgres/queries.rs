//! The stores' SQL, one file each under `queries/`, with the table's name
//! in it, and one function per file that binds its parameters.

use std::time::Duration;

use sqlx::{AssertSqlSafe, Postgres, postgres::PgArguments, query::Query};

use crate::{Fingerprint, RecordId};

pub(super) type PgQuery<'q> = Query<'q, Postgres, PgArguments>;

/// The queries of one table.
pub(super) struct Queries {
    pub(super) schema: String,
    claim: String,
    complete: String,
    release: String,
    renew: String,
    lookup: String,
    purge: String,
    wait: String,
    call_claim: String,
    probe_claim: String,
    commit_record: String,
    committed: String,
    lookup_locked: String,
    wait_unlocked: &'static str,
    begin_find_out: &'static str,
    /// The `NOTIFY` channel of the plain store's completions and releases.
    pub(super) channel: String,
    /// Whether statements are prepared once per connection and kept: not
    /// when the pool's statement cache is off (behind a transaction pooler
    /// that keeps no prepared statement across transactions, sqlx 0.9 would
    /// still name each statement it prepares, and the next client of the
    /// server connection would find the name taken).
    pub(super) persistent: bool,
}

impl Queries {
    pub(super) fn for_table(table: &str, persistent: bool) -> Self {
        let named = |sql: &str| sql.replace("{table}", table);
        Self {
            schema: named(include_str!("queries/schema.sql")),
            claim: named(include_str!("queries/claim.sql")),
            complete: named(include_str!("queries/complete.sql")),
            release: named(include_str!("queries/release.sql")),
            renew: named(include_str!("queries/renew.sql")),
            lookup: named(include_str!("queries/lookup.sql")),
            purge: named(include_str!("queries/purge.sql")),
            wait: named(include_str!("queries/wait.sql")),
            call_claim: named(include_str!("queries/call_claim.sql")),
            probe_claim: named(include_str!("queries/probe_claim.sql")),
            commit_record: named(include_str!("queries/commit_record.sql")),
            committed: named(include_str!("queries/committed.sql")),
            lookup_locked: named(include_str!("queries/lookup_locked.sql")),
            wait_unlocked: include_str!("queries/wait_unlocked.sql"),
            begin_find_out: include_str!("queries/begin_find_out.sql"),
            channel: format!("{table}_settled"),
            persistent,
        }
    }

    pub(super) fn claim(
        &self,
        id: &RecordId,
        owner: &[u8; 16],
        fingerprint: &Fingerprint,
        lease: Duration,
        replace_completed: bool,
    ) -> PgQuery<'_> {
        self.query(&self.claim)
            .bind(*id.as_bytes())
            .bind(*owner)
            .bind(*fingerprint.as_bytes())
            .bind(millis(lease))
            .bind(replace_completed)
    }

    pub(super) fn complete<'q>(
        &'q self,
        id: &RecordId,
        owner: &[u8; 16],
        record: &'q [u8],
        retention: Duration,
    ) -> PgQuery<'q> {
        self.query(&self.complete).bind(*id.as_bytes()).bind(*owner).bind(record).bind(millis(retention))
    }

    pub(super) fn release(&self, id: &RecordId, owner: &[u8; 16]) -> PgQuery<'_> {
        self.query(&self.release).bind(*id.as_bytes()).bind(*owner)
    }

    pub(super) fn renew(&self, id: &RecordId, owner: &[u8; 16], lease: Duration) -> PgQuery<'_> {
        self.query(&self.renew).bind(*id.as_bytes()).bind(*owner).bind(millis(lease))
    }

    pub(super) fn lookup(&self, id: &RecordId) -> PgQuery<'_> {
        self.query(&self.lookup).bind(*id.as_bytes())
    }

    pub(super) fn purge(&self, limit: i64) -> PgQuery<'_> {
        self.query(&self.purge).bind(limit)
    }

    pub(super) fn wait(&self, id: &RecordId) -> PgQuery<'_> {
        self.query(&self.wait).bind(*id.as_bytes())
    }

    fn query<'q>(&self, sql: &'q str) -> PgQuery<'q> {
        sqlx::query(AssertSqlSafe(sql)).persistent(self.persistent)
    }

    pub(super) fn call_claim(&self, locks: (i64, i64), id: &RecordId, replace_completed: bool) -> PgQuery<'_> {
        self.query(&self.call_claim).bind(locks.0).bind(locks.1).bind(*id.as_bytes()).bind(replace_completed)
    }

    pub(super) fn probe_claim(&self, id: &RecordId, fencing_token: i64, fingerprint: &Fingerprint) -> PgQuery<'_> {
        self.query(&self.probe_claim).bind(*id.as_bytes()).bind(fencing_token).bind(*fingerprint.as_bytes())
    }

    pub(super) fn commit_record<'q>(
        &'q self,
        id: &RecordId,
        fencing_token: i64,
        fingerprint: &Fingerprint,
        record: &'q [u8],
        retention: Duration,
    ) -> PgQuery<'q> {
        self.query(&self.commit_record)
            .bind(*id.as_bytes())
            .bind(fencing_token)
            .bind(*fingerprint.as_bytes())
            .bind(record)
            .bind(millis(retention))
    }

    pub(super) fn committed(&self, id: &RecordId, fencing_token: i64) -> PgQuery<'_> {
        self.query(&self.committed).bind(*id.as_bytes()).bind(fencing_token)
    }

    pub(super) fn lookup_locked(&self, id: &RecordId, record_lock: i64) -> PgQuery<'_> {
        // pg_locks shows an 8-byte advisory key as two unsigned halves.
        let (high, low) = ((record_lock as u64 >> 32) as i64, (record_lock as u64 & 0xffff_ffff) as i64);
        self.query(&self.lookup_locked).bind(*id.as_bytes()).bind(high).bind(low)
    }

    /// A simple query: its lock key and timeout are written into it.
    pub(super) fn wait_unlocked(&self, fingerprint_lock: i64, timeout: Duration) -> String {
        self.wait_unlocked
            .replace("{timeout_ms}", &lock_timeout(timeout))
            .replace("{fingerprint_lock}", &fingerprint_lock.to_string())
    }

    /// A simple query: its lock keys and timeout are written into it.
    pub(super) fn begin_find_out(&self, (fingerprint_lock, record_lock): (i64, i64), timeout: Duration) -> String {
        self.begin_find_out
            .replace("{timeout_ms}", &lock_timeout(timeout))
            .replace("{fingerprint_lock}", &fingerprint_lock.to_string())
            .replace("{record_lock}", &record_lock.to_string())
    }
}

/// `timeout` as `lock_timeout` takes it: whole milliseconds, at least one,
/// at most PostgreSQL's ceiling (`i32::MAX`, about 24.8 days).
fn lock_timeout(timeout: Duration) -> String {
    timeout.as_millis().clamp(1, i32::MAX as u128).to_string()
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
