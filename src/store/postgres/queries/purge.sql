-- Deletes up to $1 expired records. A session-bound claim may outlive its
-- lease while its owner's session lives: it goes a day after (one whose
-- owner died is taken over by the next claim of its key before that).
DELETE FROM {table}
WHERE ctid IN (
    SELECT ctid FROM {table}
    WHERE expires_at <= now()
      AND (owner IS NULL OR NOT session_bound OR expires_at <= now() - interval '1 day')
    LIMIT $1
)
