-- Gives up a live claim of owner $2.
DELETE FROM {table} WHERE id = $1 AND owner = $2 AND expires_at > now()
