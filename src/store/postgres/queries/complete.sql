-- Completes a live claim of owner $2 with record $3, kept for $4 ms; wakes
-- the duplicates waiting for it. `done` is 1, or 0 for another owner.
WITH done AS (
    UPDATE {table}
    SET owner = NULL, record = $3, expires_at = clock_timestamp() + $4::float8 * interval '1 millisecond'
    WHERE id = $1 AND owner = $2 AND expires_at > clock_timestamp()
    RETURNING id, waiting
)
SELECT (SELECT count(*) FROM done) AS done,
       (SELECT count(*) FROM (SELECT pg_notify('{table}_settled', encode(id, 'hex')) FROM done WHERE waiting) AS n)
           AS notified
