-- Whether the completion of record $1 with fencing token $2 committed.
SELECT EXISTS (SELECT 1 FROM {table} WHERE id = $1 AND fencing_token = $2 AND owner IS NULL) AS committed
