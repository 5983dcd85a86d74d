-- Vigil schema, version 6: commands that run at most once (late and unknown outcomes,
-- cancellation), the database's identity (the namespace of command ids on agents), and the
-- maintenance flag that remediation and alerts read.

-- A command's status is now one of: pending | sent | succeeded | failed | timed_out | unknown
-- (it may or may not have run: an SSH connection or an agent died while it ran) | cancelled
-- (never sent: its service was paused, stopped or in maintenance, or the deadline passed first).
ALTER TABLE commands
    -- When the agent reported that it started the command (from its journal).
    ADD COLUMN started_at     TIMESTAMPTZ,
    -- The outcome the agent reported after the command had already been closed (timed out at
    -- its deadline, or unknown): both facts are kept.
    ADD COLUMN late_status    TEXT,
    ADD COLUMN late_exit_code INTEGER,
    ADD COLUMN late_output    TEXT,
    ADD COLUMN late_at        TIMESTAMPTZ;

-- One row: a random identity of this database. Command ids are unique within it only; agents
-- key their journal by (this identity, command id), so a new database never collides with an
-- old one's ids.
CREATE TABLE instance (
    one  BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
    uid  TEXT NOT NULL DEFAULT gen_random_uuid()::text
);
INSERT INTO instance DEFAULT VALUES;

-- Set while a maintenance window covers the service (by the maintenance pass): no restarts and
-- no alerts while maintenance_until > now().
ALTER TABLE service_state
    ADD COLUMN maintenance_id    BIGINT,
    ADD COLUMN maintenance_until TIMESTAMPTZ;
