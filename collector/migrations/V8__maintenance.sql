-- Vigil schema, version 8: service labels and maintenance windows. Which services a window
-- covers now is decided by the collector's maintenance pass and written to
-- service_state.maintenance_id / maintenance_until (added by V6).

-- `labels:` of the service file (string -> string).
ALTER TABLE services
    ADD COLUMN labels JSONB NOT NULL DEFAULT '{}';

-- A scheduled silence. `spec` is the window as the operator gave it (one-off from/to, or
-- daily/weekly start, duration and time zone; the matcher: services, nodes, categories,
-- labels), normalized at creation; the collector evaluates it.
CREATE TABLE maintenance_windows (
    id          BIGSERIAL PRIMARY KEY,
    name        TEXT NOT NULL,
    created_by  TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    spec        JSONB NOT NULL
);
