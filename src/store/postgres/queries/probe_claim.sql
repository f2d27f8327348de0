-- Under REPEATABLE READ or SERIALIZABLE the transaction's snapshot was taken
-- before the claim held the record's lock, so a record committed in between
-- is invisible to it; writing the record's row finds it, with a
-- serialization failure, and the claim starts over. The row stays the
-- request's own and uncommitted until its completion writes the record over
-- it. $1 id, $2 fencing token, $3 fingerprint.
INSERT INTO {table} (id, owner, fencing_token, fingerprint, record, expires_at)
VALUES ($1, '\x00'::bytea, $2, $3, NULL, now())
ON CONFLICT (id) DO NOTHING
