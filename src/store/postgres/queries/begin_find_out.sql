-- Opens a transaction that waits, up to {timeout_ms} ms, for the record's
-- lock: until the transaction whose commit was lost from sight is over. At
-- READ COMMITTED, so that the statement that follows sees what it committed.
BEGIN ISOLATION LEVEL READ COMMITTED;
SET LOCAL lock_timeout = '{timeout_ms}ms';
SELECT pg_advisory_xact_lock({record_lock})
