-- A live record's state.
SELECT owner IS NULL AS completed, fencing_token, fingerprint, record
FROM {table}
WHERE id = $1 AND expires_at > now()
