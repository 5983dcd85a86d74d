-- Vigil schema, version 2: remediation. Operator modes (stopped, paused), flap detection, the
-- restart budget and grace period on service_state; the commands queue; event kinds.

ALTER TABLE service_state
    ADD COLUMN mode            TEXT NOT NULL DEFAULT 'active',  -- active | stopped | paused
    ADD COLUMN paused_until    TIMESTAMPTZ,
    ADD COLUMN flapping        BOOLEAN NOT NULL DEFAULT false,
    ADD COLUMN history         BIGINT NOT NULL DEFAULT 0,       -- last results, 1 bit each, newest in bit 0
    ADD COLUMN history_len     INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN healthy_since   TIMESTAMPTZ,
    ADD COLUMN restarts_used   INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN gave_up_at      TIMESTAMPTZ,
    ADD COLUMN grace_until     TIMESTAMPTZ;

ALTER TABLE events
    ADD COLUMN kind TEXT NOT NULL DEFAULT 'state';                -- state | mode | flapping | remediation

-- Every start/stop/restart/check, automatic or manual, with its outcome.
CREATE TABLE commands (
    id           BIGSERIAL PRIMARY KEY,
    service_id   TEXT NOT NULL,
    node         TEXT NOT NULL,
    action       TEXT NOT NULL,                 -- start | stop | restart | check
    origin       TEXT NOT NULL,                 -- auto | manual
    requested_by TEXT NOT NULL,
    reason       TEXT NOT NULL DEFAULT '',
    via          TEXT,                          -- agent | ssh, once dispatched
    status       TEXT NOT NULL DEFAULT 'pending', -- pending | sent | succeeded | failed | timed_out
    attempt      INTEGER NOT NULL DEFAULT 1,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    sent_at      TIMESTAMPTZ,
    finished_at  TIMESTAMPTZ,
    deadline     TIMESTAMPTZ NOT NULL,
    exit_code    INTEGER,
    output       TEXT NOT NULL DEFAULT ''
);
CREATE INDEX commands_service_time ON commands (service_id, created_at DESC);
-- At most one start/stop/restart in flight per service.
CREATE UNIQUE INDEX commands_one_in_flight ON commands (service_id)
    WHERE status IN ('pending', 'sent') AND action <> 'check';
