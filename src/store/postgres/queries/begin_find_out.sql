-- Opens a transaction that waits, up to {timeout_ms} ms, for the record's
-- locks (its fingerprint's first, as a claim takes them): until the
-- transaction whose commit was lost from sight is over, while no claim can
-- take the key. At READ COMMITTED, so that the statement that follows sees
-- what it committed.
BEGIN ISOLATION LEVEL READ COMMITTED;
SET LOCAL lock_timeout = '{timeout_ms}ms';
SELECT pg_advisory_xact_lock({fingerprint_lock});
SELECT pg_advisory_xact_lock({record_lock})
