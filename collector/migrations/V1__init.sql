-- Vigil schema, version 1: nodes, services, check results, current service state, state events.

CREATE TABLE nodes (
    name            TEXT PRIMARY KEY,
    address         TEXT NOT NULL DEFAULT '',
    description     TEXT NOT NULL DEFAULT '',
    active          BOOLEAN NOT NULL DEFAULT true,
    agent_connected BOOLEAN NOT NULL DEFAULT false,
    agent_version   TEXT,
    capabilities    JSONB,
    connected_at    TIMESTAMPTZ,
    last_seen       TIMESTAMPTZ
);

CREATE TABLE services (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    category      TEXT NOT NULL,
    node          TEXT NOT NULL,
    description   TEXT NOT NULL DEFAULT '',
    check_kind    TEXT NOT NULL,
    spec          JSONB NOT NULL,
    after_failures INTEGER NOT NULL,
    recover_after INTEGER NOT NULL,
    active        BOOLEAN NOT NULL DEFAULT true,
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Every result an agent reported. (node, outbox_epoch, seq) identifies a result: a re-sent
-- result conflicts and is stored once.
CREATE TABLE check_results (
    id             BIGSERIAL PRIMARY KEY,
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
    received_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (node, outbox_epoch, seq)
);
CREATE INDEX check_results_service_time ON check_results (service_id, started_at DESC);

CREATE TABLE service_state (
    service_id            TEXT PRIMARY KEY,
    state                 TEXT NOT NULL DEFAULT 'unknown',
    state_since           TIMESTAMPTZ NOT NULL DEFAULT now(),
    consecutive_failures  INTEGER NOT NULL DEFAULT 0,
    consecutive_successes INTEGER NOT NULL DEFAULT 0,
    last_status           SMALLINT,
    last_check_at         TIMESTAMPTZ,
    last_response_ms      INTEGER,
    last_message          TEXT,
    last_error            TEXT,
    last_error_at         TIMESTAMPTZ
);

CREATE TABLE events (
    id          BIGSERIAL PRIMARY KEY,
    service_id  TEXT NOT NULL,
    at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    from_state  TEXT NOT NULL,
    to_state    TEXT NOT NULL,
    reason      TEXT NOT NULL
);
CREATE INDEX events_service_time ON events (service_id, at DESC);
