-- Completes a live claim of owner $2 with record $3, kept for $4 ms; wakes
-- the duplicates waiting for it. `done` is 1, or 0 for another owner. The
-- clock is read now, not at the start of a transaction this may end. A
-- session-bound claim lives as long as its owner's session, whose
-- transaction this runs in: its lease does not end it.
WITH done AS (
    UPDATE {table}
    SET owner = NULL, record = $3, expires_at = clock_timestamp() + $4::float8 * interval '1 millisecond'
    WHERE id = $1 AND owner = $2 AND (expires_at > clock_timestamp() OR session_bound)
    RETURNING id, waiting
)
SELECT (SELECT count(*) FROM done) AS done,
       (SELECT count(*) FROM (SELECT pg_notify('{table}_settled', encode(id, 'hex')) FROM done WHERE waiting) AS n)
           AS notified
