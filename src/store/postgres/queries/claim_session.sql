-- Claims a record for a request whose transaction follows (a transactional
-- store): like claim.sql, but the claim holds the advisory lock $6, a
-- session lock that the request's transaction takes over as its own. A
-- session-bound in-flight record whose lock is free lost its owner's
-- session (a crash): it is taken over at once. Answers as claim.sql; no
-- state: the lock or the row was busy for a moment, claim again. The lock
-- is kept only when the answer is 'acquired'. Its commit does not wait for
-- the disk: a crash that loses the in-flight record also ends the session
-- whose transaction it guards, and that transaction's COMMIT flushes it.
-- $1 id, $2 owner, $3 fingerprint, $4 lease in ms, $5 replace completed, $6 lock.
WITH locked AS MATERIALIZED (
    SELECT pg_try_advisory_lock($6) AS held, set_config('synchronous_commit', 'off', true) AS unflushed
),
claimed AS (
    INSERT INTO {table} AS t (id, owner, fencing_token, fingerprint, record, expires_at, session_bound)
    SELECT $1, $2, nextval('{table}_fencing'), $3, NULL, now() + $4::float8 * interval '1 millisecond', true
    FROM locked WHERE held
    ON CONFLICT (id) DO UPDATE
        SET owner = EXCLUDED.owner, fencing_token = EXCLUDED.fencing_token,
            fingerprint = EXCLUDED.fingerprint, record = NULL, expires_at = EXCLUDED.expires_at,
            waiting = false, session_bound = true
        WHERE t.expires_at <= now() OR ($5 AND t.owner IS NULL) OR (t.session_bound AND t.owner IS NOT NULL)
    RETURNING fencing_token
),
answer AS (
    SELECT 'acquired' AS state, fencing_token, NULL::bytea AS fingerprint, NULL::bytea AS record FROM claimed
    UNION ALL
    SELECT CASE WHEN owner IS NULL THEN 'completed' ELSE 'in_flight' END, fencing_token, fingerprint, record
    FROM {table}
    WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM claimed)
      AND (expires_at > now() OR (owner IS NOT NULL AND session_bound AND NOT (SELECT held FROM locked)))
)
SELECT answer.state, answer.fencing_token, answer.fingerprint, answer.record,
       CASE WHEN locked.held AND answer.state IS DISTINCT FROM 'acquired' THEN pg_advisory_unlock($6) END AS unlocked
FROM locked LEFT JOIN answer ON true
