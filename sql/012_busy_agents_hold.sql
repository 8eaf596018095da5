-- A group that does not ring an agent who is on a call already (FreePBX's "Skip Busy Agent", a queue's
-- ringinuse = no): asked of the PBX at ring time, so an agent talking on a call the PBX placed without
-- us (their own outgoing call, a transfer) is skipped too. Off by default: call waiting is the PBX's way.
-- With hold_seconds, a caller who finds every agent of such a group busy waits in line (hold music, their
-- place said) for up to that long; hold_queue holds the line, one row per waiting call, across processes.
-- Never edit after it has landed: add a new file.

ALTER TABLE groups ADD COLUMN skip_busy boolean NOT NULL DEFAULT false;
ALTER TABLE groups ADD COLUMN hold_seconds integer NOT NULL DEFAULT 0
    CHECK (hold_seconds BETWEEN 0 AND 3600 AND (hold_seconds = 0 OR skip_busy));

CREATE TABLE hold_queue (
    uniqueid  text PRIMARY KEY,
    group_id  integer NOT NULL REFERENCES groups (id) ON DELETE CASCADE,
    joined_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- refreshed by the waiting call at every check: a row left by a process that died stops counting
    seen_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX hold_queue_line ON hold_queue (group_id, joined_at);
