-- A group that does not ring an agent who is on a call already (FreePBX's "Skip Busy Agent", a queue's
-- ringinuse = no): asked of the PBX at ring time, so an agent talking on a call the PBX placed without
-- us (their own outgoing call, a transfer) is skipped too. Off by default: call waiting is the PBX's way.
-- Never edit after it has landed: add a new file.

ALTER TABLE groups ADD COLUMN skip_busy boolean NOT NULL DEFAULT false;
