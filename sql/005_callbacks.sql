-- Offering callback requests to agents (issue 3): who holds a request and since when, so a crashed
-- worker's requests can be given back, and what the last attempt did.
ALTER TABLE callback_requests
    ADD COLUMN claimed_at     timestamptz,  -- set when a worker takes the request (status in_progress)
    ADD COLUMN agent_endpoint text,         -- the agent whose phone is being rung for it
    ADD COLUMN connected_at   timestamptz,  -- the agent answered: the callback flow owns the request now
    ADD COLUMN last_result    text;         -- answered | no_answer | busy | failed | customer_no_answer | ...
CREATE INDEX callback_in_progress_idx ON callback_requests (agent_endpoint) WHERE status = 'in_progress';
