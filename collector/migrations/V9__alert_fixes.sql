-- Vigil schema, version 9: a node's maintenance. Written only by the collector's maintenance
-- pass (with service_state.maintenance_until): a node is in maintenance while
-- maintenance_until > now(), that is while a window naming the node (and nothing narrower) is
-- in force, or every active service of the node (at least one) is in maintenance. Then no node
-- alert (node_down, backlog) is opened or reminded and its agent is not restarted over SSH.
ALTER TABLE nodes
    ADD COLUMN maintenance_until TIMESTAMPTZ;
