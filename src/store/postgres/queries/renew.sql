-- Extends a live claim of owner $2 to $3 ms from now.
UPDATE {table}
SET expires_at = now() + $3::float8 * interval '1 millisecond'
WHERE id = $1 AND owner = $2 AND expires_at > now()
