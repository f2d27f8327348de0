-- Completes a live claim of owner $2 with record $3, kept for $4 ms; wakes
-- the duplicates waiting for it. `done` is 1, also when this very record is
-- there already (a retry after the first attempt committed, its reply
-- lost), or 0 for another owner. The outer statement reads the table as it
-- was before the update: a row this call completes is not counted twice.
WITH done AS (
    UPDATE {table}
    SET owner = NULL, record = $3, expires_at = clock_timestamp() + $4::float8 * interval '1 millisecond'
    WHERE id = $1 AND owner = $2 AND expires_at > clock_timestamp()
    RETURNING id, waiting
)
SELECT (SELECT count(*) FROM done)
         + (SELECT count(*) FROM {table}
            WHERE id = $1 AND owner IS NULL AND record = $3 AND expires_at > clock_timestamp()) AS done,
       (SELECT count(*) FROM (SELECT pg_notify('{table}_settled', encode(id, 'hex')) FROM done WHERE waiting) AS n)
           AS notified
