-- Callers the shop takes no calls from (spam, abuse): their calls are refused before the greeting, with a
-- row of outcome 'blocked' that is neither answered nor missed. `until` NULL blocks until removed.
-- Never edit after it has landed: add a new file.

CREATE TABLE blocked_callers (
    phone      text PRIMARY KEY CHECK (phone ~ '^\+[1-9][0-9]{6,14}$'),
    reason     text NOT NULL DEFAULT '' CHECK (length(reason) <= 200),
    until      timestamptz,
    source     text NOT NULL DEFAULT 'cli' CHECK (source IN ('cli', 'api')),
    created_at timestamptz NOT NULL DEFAULT now()
);
