-- Marks a live in-flight record as waited for, so that its completion or
-- release notifies; no row when it is not in flight. A session-bound one
-- stays in flight past its lease while its owner's session lives.
UPDATE {table} SET waiting = true WHERE id = $1 AND owner IS NOT NULL AND (expires_at > now() OR session_bound)
