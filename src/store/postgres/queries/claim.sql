-- Claims a record in one statement: inserts it, or takes over an expired
-- one (or a completed one with $5), and answers 'acquired' with the new
-- fencing token; otherwise answers what holds the record. No row: a
-- concurrent claim committed after this statement's snapshot; claim again.
-- $1 id, $2 owner, $3 fingerprint, $4 lease in ms, $5 replace completed.
WITH claimed AS (
    INSERT INTO {table} AS t (id, owner, fencing_token, fingerprint, record, expires_at)
    VALUES ($1, $2, nextval('{table}_fencing'), $3, NULL, now() + $4::float8 * interval '1 millisecond')
    ON CONFLICT (id) DO UPDATE
        SET owner = EXCLUDED.owner, fencing_token = EXCLUDED.fencing_token,
            fingerprint = EXCLUDED.fingerprint, record = NULL, expires_at = EXCLUDED.expires_at,
            waiting = false
        WHERE t.expires_at <= now() OR ($5 AND t.owner IS NULL)
    RETURNING fencing_token
)
SELECT 'acquired' AS state, fencing_token, NULL::bytea AS fingerprint, NULL::bytea AS record FROM claimed
UNION ALL
SELECT CASE WHEN owner IS NULL THEN 'completed' ELSE 'in_flight' END, fencing_token, fingerprint, record
FROM {table}
WHERE id = $1 AND expires_at > now() AND NOT EXISTS (SELECT 1 FROM claimed)
