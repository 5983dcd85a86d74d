-- check_results becomes a table partitioned by day on started_at (UTC), converted in place.
--
-- Partitions are named check_results_pYYYYMMDD and hold [day, day + 1) UTC; the collector
-- creates them ahead and drops them whole past retention.raw (store/history.rs). A result dated
-- outside every partition (an agent backlog older than the oldest partition, a check-now answer
-- with an odd clock) lands in check_results_default, which retention purges row by row (it only
-- ever holds such stragglers).
--
-- Indexes: the idempotency key must include the partition key, so it is
-- (node, outbox_epoch, seq, started_at); the surrogate id keeps its sequence (the API pages by
-- it) but loses its B-tree; (service_id, started_at) serves a service's results.

ALTER TABLE check_results RENAME TO check_results_v10;
ALTER TABLE check_results_v10 RENAME CONSTRAINT check_results_pkey TO check_results_v10_pkey;
ALTER TABLE check_results_v10 RENAME CONSTRAINT check_results_node_outbox_epoch_seq_key
    TO check_results_v10_key;
ALTER INDEX check_results_service_time RENAME TO check_results_v10_service_time;

CREATE TABLE check_results (
    id             BIGINT NOT NULL DEFAULT nextval('check_results_id_seq'),
    node           TEXT NOT NULL,
    outbox_epoch   BIGINT NOT NULL,
    seq            BIGINT NOT NULL,
    service_id     TEXT NOT NULL,
    started_at     TIMESTAMPTZ NOT NULL,
    duration_ms    INTEGER NOT NULL,
    status         SMALLINT NOT NULL,          -- 0 ok, 1 warning, 2 critical, 3 unknown
    message        TEXT NOT NULL,
    metrics        JSONB NOT NULL DEFAULT '[]',
    output         TEXT NOT NULL DEFAULT '',
    config_version BIGINT NOT NULL DEFAULT 0,
    received_at    TIMESTAMPTZ NOT NULL DEFAULT now()
) PARTITION BY RANGE (started_at);
ALTER SEQUENCE check_results_id_seq OWNED BY check_results.id;

CREATE TABLE check_results_default PARTITION OF check_results DEFAULT;

-- A partition for every UTC day that holds rows (from 2000 on), and for today and the next
-- three days; rows of other days go to the default partition.
DO $$
DECLARE
    d date;
BEGIN
    FOR d IN
        SELECT DISTINCT (started_at AT TIME ZONE 'UTC')::date FROM check_results_v10
        WHERE started_at >= '2000-01-01T00:00:00Z'
          AND started_at < (now() AT TIME ZONE 'UTC')::date + 4
        UNION
        SELECT (now() AT TIME ZONE 'UTC')::date + i FROM generate_series(0, 3) AS i
    LOOP
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF check_results FOR VALUES FROM (%L) TO (%L)',
            'check_results_p' || to_char(d, 'YYYYMMDD'),
            d::timestamp AT TIME ZONE 'UTC',
            (d + 1)::timestamp AT TIME ZONE 'UTC');
    END LOOP;
END
$$;

INSERT INTO check_results (id, node, outbox_epoch, seq, service_id, started_at, duration_ms,
                           status, message, metrics, output, config_version, received_at)
SELECT id, node, outbox_epoch, seq, service_id, started_at, duration_ms, status, message,
       metrics, output, config_version, received_at
FROM check_results_v10;

-- Indexes after the rows (one sorted build per partition instead of row-by-row inserts).
ALTER TABLE check_results ADD CONSTRAINT check_results_key
    UNIQUE (node, outbox_epoch, seq, started_at);
CREATE INDEX check_results_service_time ON check_results (service_id, started_at DESC);

DROP TABLE check_results_v10;
