-- Completes a live claim of owner $2 with record $3, kept for $4 ms.
UPDATE {table}
SET owner = NULL, record = $3, expires_at = now() + $4::float8 * interval '1 millisecond'
WHERE id = $1 AND owner = $2 AND expires_at > now()
