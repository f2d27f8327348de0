-- Opens a request's transaction and takes its locks without waiting, in one
-- round trip (a simple query: the keys are numbers the store derives, never
-- client bytes). First the lock of the record and the claimant's
-- fingerprint, then the record's: whoever holds the record's lock holds its
-- fingerprint's too. 'busy': a request with the same fingerprint holds it;
-- 'other': one with another fingerprint holds the record; 'locked': the
-- record is this request's, and the next statement, which starts after the
-- lock is held, reads its state.
BEGIN;
SELECT set_config('tower_idempotency.claim',
    CASE WHEN NOT pg_try_advisory_xact_lock({fingerprint_lock}) THEN 'busy'
         WHEN pg_try_advisory_xact_lock({record_lock}) THEN 'locked'
         ELSE 'other' END,
    true)
