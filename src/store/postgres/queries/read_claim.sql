-- What a claim found ($1 id, $2 replace completed): the locks' verdict, the
-- transaction's isolation, the completed record, and for a record that is
-- now the request's, a fencing token.
SELECT current_setting('tower_idempotency.claim') AS state,
       current_setting('transaction_isolation') AS isolation,
       t.record,
       CASE WHEN current_setting('tower_idempotency.claim') = 'locked' AND (t.id IS NULL OR $2)
            THEN nextval('{table}_fencing') END AS fencing_token
FROM (SELECT 1) AS one
LEFT JOIN {table} AS t ON t.id = $1 AND t.owner IS NULL AND t.expires_at > now()
