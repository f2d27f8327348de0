-- One table of records (in flight, of the plain store: an owner;
-- completed: a record; waiting: a duplicate of the plain store waits to be
-- notified), a sequence of fencing tokens, an index for purging expired
-- records, and the transactional store's claim.
CREATE TABLE IF NOT EXISTS {table} (
    id BYTEA PRIMARY KEY,
    owner BYTEA,
    fencing_token BIGINT NOT NULL,
    fingerprint BYTEA NOT NULL,
    record BYTEA,
    expires_at TIMESTAMPTZ NOT NULL,
    waiting BOOLEAN NOT NULL DEFAULT false
);
CREATE SEQUENCE IF NOT EXISTS {table}_fencing;
CREATE INDEX IF NOT EXISTS {table}_expires_at ON {table} (expires_at);
-- The transactional store's claim, in the request's transaction: takes its
-- locks without waiting (the record and fingerprint's first, then the
-- record's: whoever holds the record's holds its fingerprint's too), then
-- reads the completed record, and for a record now the request's takes a
-- fencing token. 'busy': a request with the same fingerprint holds its lock;
-- 'other': one with another fingerprint holds the record. A volatile
-- function's statements take their own snapshots (at READ COMMITTED), so the
-- read starts after the locks are held; a plan kept per session, nothing
-- parsed per claim.
CREATE OR REPLACE FUNCTION {table}_claim(record_lock BIGINT, fingerprint_lock BIGINT, record_id BYTEA, replace_completed BOOLEAN)
RETURNS TABLE (state TEXT, isolation TEXT, record BYTEA, fencing_token BIGINT)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF NOT pg_try_advisory_xact_lock(fingerprint_lock) THEN
        state := 'busy';
    ELSIF pg_try_advisory_xact_lock(record_lock) THEN
        state := 'locked';
    ELSE
        state := 'other';
    END IF;
    isolation := current_setting('transaction_isolation');
    SELECT t.record INTO record FROM {table} AS t
    WHERE t.id = record_id AND t.owner IS NULL AND t.expires_at > now();
    IF state = 'locked' AND (record IS NULL OR replace_completed) THEN
        fencing_token := nextval('{table}_fencing');
    END IF;
    RETURN NEXT;
END
$$;
