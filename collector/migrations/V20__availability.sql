-- Availability reads, per service and event kind, the last transition before a window and the
-- transitions inside it (collector/src/store/availability.rs): both are ranges of this index,
-- in (at, id) order, whatever the other kinds of events (flapping, remediation) in between.
CREATE INDEX events_service_kind_time ON events (service_id, kind, at, id);
