-- The highest seq stored per agent outbox. An agent sends an outbox's results in seq order and
-- the collector commits them in that order, so every seq up to stored_seq is stored: a batch's
-- results above it are new and are written with COPY (see store/ingest.rs).
CREATE TABLE outbox_progress (
    node         TEXT NOT NULL,
    outbox_epoch BIGINT NOT NULL,
    stored_seq   BIGINT NOT NULL,
    PRIMARY KEY (node, outbox_epoch)
);

-- Results stored before this table existed. Epoch 0 (check-now answers) is not an outbox.
INSERT INTO outbox_progress (node, outbox_epoch, stored_seq)
SELECT node, outbox_epoch, max(seq) FROM check_results WHERE outbox_epoch <> 0
GROUP BY node, outbox_epoch;
