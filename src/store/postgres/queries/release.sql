-- Gives up a live claim of owner $2; wakes the duplicates waiting for it.
-- `done` is 1, or 0 for another owner.
WITH done AS (
    DELETE FROM {table} WHERE id = $1 AND owner = $2 AND expires_at > now()
    RETURNING id, waiting
)
SELECT (SELECT count(*) FROM done) AS done,
       (SELECT count(*) FROM (SELECT pg_notify('{table}_settled', encode(id, 'hex')) FROM done WHERE waiting) AS n)
           AS notified
