-- A claim of the transactional store, right after its BEGIN: $1 the
-- record's lock, $2 the record and fingerprint's, $3 the record id, $4
-- replace a completed record (schema.sql has the function).
SELECT state, isolation, record, fencing_token FROM {table}_claim($1, $2, $3, $4)
