-- The live view (GET /api/v1/live, `shopcall live`) shows a supervisor who is waiting in line: the caller's
-- number as the PBX gave it (the rows of calls already waiting when this lands have none).
-- Never edit after it has landed: add a new file.

ALTER TABLE hold_queue ADD COLUMN caller_number text;
