-- Roll-ups per service per hour and per day, merged by ingest in the transaction that stores
-- the results (collector/src/rollup.rs does the arithmetic), kept far longer than raw results.
-- They replace daily_stats (V3).
--
-- Half-empty pages (fillfactor 50): a row is rewritten by every batch of its service and
-- hour, and room on its page lets PostgreSQL do it without new index entries (HOT).
--
-- agg (in rollup_hourly_detail for hours) is the mergeable form (counts, sums, min/max and log-bucket histograms of the response
-- time and of each numeric perfdata label); the columns beside it are what reads need. The
-- time-in-state columns are written by the roll-up worker from state, stale and mode events
-- once the hour is over (and added to the day).

CREATE TABLE rollup_hourly (
    service_id  TEXT NOT NULL,
    hour        TIMESTAMPTZ NOT NULL,
    checks      BIGINT NOT NULL DEFAULT 0,
    failures    BIGINT NOT NULL DEFAULT 0,
    min_ms      DOUBLE PRECISION,
    avg_ms      DOUBLE PRECISION,
    p95_ms      DOUBLE PRECISION,
    max_ms      DOUBLE PRECISION,
    up_ms       BIGINT NOT NULL DEFAULT 0,
    down_ms     BIGINT NOT NULL DEFAULT 0,
    stale_ms    BIGINT NOT NULL DEFAULT 0,
    paused_ms   BIGINT NOT NULL DEFAULT 0,
    unknown_ms  BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (service_id, hour)
) WITH (fillfactor = 50);
-- The wide part of an hour (perfdata summaries, histograms: 1–2 KB), apart so that the
-- service list's 24-hour sums read ~100-byte rows.
CREATE TABLE rollup_hourly_detail (
    service_id  TEXT NOT NULL,
    hour        TIMESTAMPTZ NOT NULL,
    metrics     JSONB NOT NULL DEFAULT '{}',
    agg         JSONB NOT NULL DEFAULT '{}',
    PRIMARY KEY (service_id, hour)
) WITH (fillfactor = 50);
CREATE INDEX rollup_hourly_hour ON rollup_hourly (hour);

CREATE TABLE rollup_daily (
    service_id  TEXT NOT NULL,
    day         DATE NOT NULL,
    checks      BIGINT NOT NULL DEFAULT 0,
    failures    BIGINT NOT NULL DEFAULT 0,
    min_ms      DOUBLE PRECISION,
    avg_ms      DOUBLE PRECISION,
    p95_ms      DOUBLE PRECISION,
    max_ms      DOUBLE PRECISION,
    metrics     JSONB NOT NULL DEFAULT '{}',
    agg         JSONB NOT NULL DEFAULT '{}',
    up_ms       BIGINT NOT NULL DEFAULT 0,
    down_ms     BIGINT NOT NULL DEFAULT 0,
    stale_ms    BIGINT NOT NULL DEFAULT 0,
    paused_ms   BIGINT NOT NULL DEFAULT 0,
    unknown_ms  BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (service_id, day)
) WITH (fillfactor = 50);
CREATE INDEX rollup_daily_day ON rollup_daily (day);

-- Up to which hour the worker has written the time in each state ('states').
CREATE TABLE rollup_progress (
    key   TEXT PRIMARY KEY,
    done  TIMESTAMPTZ NOT NULL
);

-- Roll-ups of the results already stored: counts, failures and the response-time histogram
-- (the same buckets as rollup.rs: 8 per doubling, offset 10000; 0 for 0 ms); perfdata of
-- results stored before this version is not rolled up.
CREATE FUNCTION pg_temp.rollup_bucket(ms double precision) RETURNS int LANGUAGE sql IMMUTABLE AS
$$ SELECT CASE WHEN ms <= 0 THEN 0 ELSE floor(log(2.0, ms::numeric) * 8)::int + 10000 END $$;

CREATE TEMP TABLE rollup_seed AS
SELECT service_id, date_trunc('hour', started_at, 'UTC') AS hour,
       pg_temp.rollup_bucket(duration_ms) AS b, count(*) AS n,
       count(*) FILTER (WHERE status >= 2) AS failed,
       min(duration_ms)::float8 AS lo, max(duration_ms)::float8 AS hi, sum(duration_ms)::float8 AS s
FROM check_results GROUP BY 1, 2, 3;

INSERT INTO rollup_hourly (service_id, hour, checks, failures, min_ms, avg_ms, max_ms)
SELECT service_id, hour, sum(n), sum(failed), min(lo), sum(s) / sum(n), max(hi)
FROM rollup_seed GROUP BY 1, 2;

INSERT INTO rollup_hourly_detail (service_id, hour, agg)
SELECT service_id, hour,
       jsonb_build_object('checks', sum(n), 'failures', sum(failed),
           'response', jsonb_build_object('n', sum(n), 'min', min(lo), 'max', max(hi),
                                          'sum', sum(s), 'hist', jsonb_object_agg(b::text, n)),
           'metrics', '{}'::jsonb, 'metrics_dropped', 0)
FROM rollup_seed GROUP BY 1, 2;

INSERT INTO rollup_daily (service_id, day, checks, failures, min_ms, avg_ms, max_ms, agg)
SELECT service_id, day, sum(n), sum(failed), min(lo), sum(s) / sum(n), max(hi),
       jsonb_build_object('checks', sum(n), 'failures', sum(failed),
           'response', jsonb_build_object('n', sum(n), 'min', min(lo), 'max', max(hi),
                                          'sum', sum(s), 'hist', jsonb_object_agg(b::text, n)),
           'metrics', '{}'::jsonb, 'metrics_dropped', 0)
FROM (SELECT service_id, (hour AT TIME ZONE 'UTC')::date AS day, b, sum(n) AS n,
             sum(failed) AS failed, min(lo) AS lo, max(hi) AS hi, sum(s) AS s
      FROM rollup_seed GROUP BY 1, 2, 3) d
GROUP BY 1, 2;

-- p95 of the seeded periods, exact (nearest rank) from the rows themselves.
UPDATE rollup_hourly h SET p95_ms = p.v
FROM (SELECT service_id, date_trunc('hour', started_at, 'UTC') AS hour,
             percentile_disc(0.95) WITHIN GROUP (ORDER BY duration_ms)::float8 AS v
      FROM check_results GROUP BY 1, 2) p
WHERE h.service_id = p.service_id AND h.hour = p.hour;
UPDATE rollup_daily d SET p95_ms = p.v
FROM (SELECT service_id, (started_at AT TIME ZONE 'UTC')::date AS day,
             percentile_disc(0.95) WITHIN GROUP (ORDER BY duration_ms)::float8 AS v
      FROM check_results GROUP BY 1, 2) p
WHERE d.service_id = p.service_id AND d.day = p.day;

DROP TABLE rollup_seed;
DROP FUNCTION pg_temp.rollup_bucket(double precision);
DROP TABLE daily_stats;
