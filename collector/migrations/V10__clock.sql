-- Each node's clock as its agent last told it in Hello: agent time minus collector time (ms),
-- and when that was measured. Results dated implausibly (beyond max_clock_skew in the future,
-- before 2000) are stored with the receive time and recorded as a 'clock' node event.
ALTER TABLE nodes ADD COLUMN clock_offset_ms BIGINT;
ALTER TABLE nodes ADD COLUMN clock_checked_at TIMESTAMPTZ;
