-- Waits, up to {timeout_ms} ms, until no request with the waiter's
-- fingerprint holds its lock (one that did ends its transaction): in one
-- implicit transaction, which takes the lock only to end. A shared lock:
-- waiters do not wait for one another.
SET LOCAL lock_timeout = '{timeout_ms}ms';
SELECT pg_advisory_xact_lock_shared({fingerprint_lock})
