-- Marks a live in-flight record as waited for, so that its completion or
-- release notifies; no row when it is not in flight.
UPDATE {table} SET waiting = true WHERE id = $1 AND owner IS NOT NULL AND expires_at > now()
