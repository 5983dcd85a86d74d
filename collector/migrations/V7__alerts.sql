-- Vigil schema, version 7: durable incidents and an outbox of alerts to deliver, with every
-- delivery attempt.

-- An incident: something wrong with a service or a node, from the alert that opened it to the
-- one that closed it. key = family:node:service (service is empty for a node's own incidents);
-- families: service, stale, node, backlog, flapping.
CREATE TABLE incidents (
    id              BIGSERIAL PRIMARY KEY,
    key             TEXT NOT NULL,
    family          TEXT NOT NULL,
    node            TEXT NOT NULL,
    service_id      TEXT,
    severity        TEXT NOT NULL,                 -- critical | warning
    opened_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    reason          TEXT NOT NULL,
    acknowledged_at TIMESTAMPTZ,
    acknowledged_by TEXT,
    resolved_at     TIMESTAMPTZ,
    resolution      TEXT,                          -- recovered | silenced by operator | ...
    -- When an alert (opening, reminder, gave-up) last went out for it: reminders count from here.
    last_alert_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    gave_up_sent    BOOLEAN NOT NULL DEFAULT false,
    -- Dependents whose own alerts were suppressed because of this incident.
    affected        TEXT[] NOT NULL DEFAULT '{}'
);
-- At most one open incident per key: opening is idempotent, whichever collector does it.
CREATE UNIQUE INDEX incidents_open_key ON incidents (key) WHERE resolved_at IS NULL;
CREATE INDEX incidents_service ON incidents (service_id, id DESC);

-- The alert outbox: one row per (alert, receiver), written in the transaction that opens or
-- closes the incident, delivered at least once by the delivery worker.
CREATE TABLE alerts (
    id              BIGSERIAL PRIMARY KEY,
    -- The alert's stable id (JSON body and Idempotency-Key header): receivers de-duplicate on it.
    uid             TEXT NOT NULL DEFAULT gen_random_uuid()::text UNIQUE,
    incident_id     BIGINT NOT NULL REFERENCES incidents (id),
    event           TEXT NOT NULL,
    receiver        TEXT NOT NULL,
    payload         JSONB NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    attempts        INTEGER NOT NULL DEFAULT 0,
    -- A worker's lease: nobody else sends the row before it expires (a dead worker's lease does).
    claimed_until   TIMESTAMPTZ,
    delivered_at    TIMESTAMPTZ,
    -- Given up after notify.give_up_after.
    failed_at       TIMESTAMPTZ,
    last_error      TEXT
);
CREATE INDEX alerts_pending ON alerts (next_attempt_at) WHERE delivered_at IS NULL AND failed_at IS NULL;
CREATE INDEX alerts_incident ON alerts (incident_id, receiver, id);

CREATE TABLE alert_attempts (
    id          BIGSERIAL PRIMARY KEY,
    alert_id    BIGINT NOT NULL REFERENCES alerts (id),
    at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    ok          BOOLEAN NOT NULL,
    http_status INTEGER,
    error       TEXT
);
CREATE INDEX alert_attempts_alert ON alert_attempts (alert_id, id);
