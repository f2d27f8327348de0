-- The completed record, written in the request's transaction before its
-- COMMIT: $1 id, $2 fencing token, $3 fingerprint, $4 record, $5 retention
-- in ms. The request holds the record's lock: nothing else writes the row.
INSERT INTO {table} AS t (id, owner, fencing_token, fingerprint, record, expires_at, waiting)
VALUES ($1, NULL, $2, $3, $4, clock_timestamp() + $5::float8 * interval '1 millisecond', false)
ON CONFLICT (id) DO UPDATE
    SET owner = NULL, fencing_token = EXCLUDED.fencing_token, fingerprint = EXCLUDED.fingerprint,
        record = EXCLUDED.record, expires_at = EXCLUDED.expires_at, waiting = false
