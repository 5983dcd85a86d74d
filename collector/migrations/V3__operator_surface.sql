-- Vigil schema, version 3: the operator surface. API tokens (hashed) and dashboard sessions,
-- runtime settings, and daily roll-ups per service.

CREATE TABLE api_tokens (
    id          BIGSERIAL PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    role        TEXT NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    -- The token is "vgl_<id>_<secret>"; only an Argon2id hash of the secret is kept.
    secret_hash TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_used   TIMESTAMPTZ,
    revoked_at  TIMESTAMPTZ
);

-- A dashboard login: the cookie holds the session id; only its SHA-256 is kept.
CREATE TABLE web_sessions (
    id_hash     TEXT PRIMARY KEY,
    token_id    BIGINT NOT NULL REFERENCES api_tokens (id),
    csrf        TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at  TIMESTAMPTZ NOT NULL
);

-- Runtime-adjustable settings (key 'health_check': enabled, interval, max_error_count, retry_after).
CREATE TABLE settings (
    key         TEXT PRIMARY KEY,
    value       JSONB NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_by  TEXT NOT NULL
);

-- One row per service and UTC day, recomputed from check_results while the day is recent.
CREATE TABLE daily_stats (
    service_id  TEXT NOT NULL,
    day         DATE NOT NULL,
    checks      BIGINT NOT NULL,
    failures    BIGINT NOT NULL,
    avg_ms      DOUBLE PRECISION,
    p95_ms      DOUBLE PRECISION,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (service_id, day)
);

