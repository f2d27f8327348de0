-- A record's completed state, and whether a request's transaction holds its
-- lock: $1 id; $2 and $3 the lock key's high and low halves, as pg_locks
-- shows them.
SELECT t.record,
       EXISTS (SELECT 1 FROM pg_locks
               WHERE locktype = 'advisory' AND granted AND objsubid = 1
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                 AND classid = $2::bigint::oid AND objid = $3::bigint::oid) AS locked
FROM (SELECT 1) AS one
LEFT JOIN {table} AS t ON t.id = $1 AND t.owner IS NULL AND t.expires_at > now()
