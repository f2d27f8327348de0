-- Deletes up to $1 expired records.
DELETE FROM {table}
WHERE ctid IN (SELECT ctid FROM {table} WHERE expires_at <= now() LIMIT $1)
