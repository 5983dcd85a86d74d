-- Vigil schema, version 5: node liveness, stale results, gaps in agent outboxes, agent backlog.

ALTER TABLE nodes
    ADD COLUMN added_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- From the config: whether an agent runs there, and how long it may stay silent.
    ADD COLUMN has_agent          BOOLEAN NOT NULL DEFAULT true,
    ADD COLUMN timeout_ms         BIGINT NOT NULL DEFAULT 60000,
    ADD COLUMN disconnected_at    TIMESTAMPTZ,
    -- Set while the node is down (its agent silent longer than timeout_ms); why.
    ADD COLUMN down_since         TIMESTAMPTZ,
    ADD COLUMN down_reason        TEXT,
    -- What the agent last said about its outbox; oldest_unacked_at is on the collector's clock.
    ADD COLUMN backlog_results    BIGINT,
    ADD COLUMN backlog_oldest_at  TIMESTAMPTZ,
    ADD COLUMN backlog_status_at  TIMESTAMPTZ,
    -- Set while a backlog incident is open (the oldest unacknowledged result is too old).
    ADD COLUMN backlog_alert_since TIMESTAMPTZ,
    -- Results missing from an outbox's seqs: dropped by the agent (outbox full) or lost.
    ADD COLUMN results_dropped    BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN results_lost       BIGINT NOT NULL DEFAULT 0,
    -- Results refused by the collector (out-of-range seq): not stored, acknowledged.
    ADD COLUMN results_refused    BIGINT NOT NULL DEFAULT 0;

-- The agent's own account of what it dropped on purpose, per outbox.
ALTER TABLE outbox_progress
    ADD COLUMN dropped_through_seq BIGINT NOT NULL DEFAULT 0;

-- Staleness: a service whose newest result is older than stale_after_ms is stale.
ALTER TABLE services
    ADD COLUMN stale_after_ms BIGINT NOT NULL DEFAULT 0,       -- 0: never stale
    ADD COLUMN on_stale       TEXT NOT NULL DEFAULT 'alert';    -- alert | ignore

ALTER TABLE service_state
    -- When the newest result was stored (the collector's clock, not the agent's).
    ADD COLUMN last_result_at TIMESTAMPTZ,
    ADD COLUMN stale_since    TIMESTAMPTZ,
    ADD COLUMN stale_reason   TEXT;
UPDATE service_state SET last_result_at = last_check_at;

-- What happened to a node: down, up, gap (results lost), dropped (by the agent), refused,
-- backlog, backlog_cleared, agent_restart.
CREATE TABLE node_events (
    id      BIGSERIAL PRIMARY KEY,
    node    TEXT NOT NULL,
    at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    kind    TEXT NOT NULL,
    reason  TEXT NOT NULL,
    count   BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX node_events_node ON node_events (node, id DESC);
