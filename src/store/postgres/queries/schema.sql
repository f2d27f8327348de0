-- One table of records (in flight, of the plain store: an owner;
-- completed: a record; waiting: a duplicate of the plain store waits to be
-- notified), a sequence of fencing tokens, and an index for purging
-- expired records.
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
