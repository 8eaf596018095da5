-- Calls the shop's CRM asks for ("click to call"): the agent's phone rings first, then the customer's,
-- through the callback machinery. A request with agent_wanted is offered to that agent only, at once; one
-- the CRM created (reason 'click_to_call') is tried once, while a pending callback the agent took over
-- goes back to the queue if it fails. external_ref is the CRM's own id, returned with the call.
-- Never edit after it has landed: add a new file.

ALTER TABLE callback_requests
    ADD COLUMN agent_wanted text,
    ADD COLUMN wanted_at    timestamptz,
    ADD COLUMN external_ref text CHECK (length(external_ref) <= 200);
CREATE INDEX callback_wanted_idx ON callback_requests (agent_wanted) WHERE status = 'pending';

-- the call that served a request (a callback or a click to call), for the CRM's webhook
ALTER TABLE calls ADD COLUMN callback_request_id bigint REFERENCES callback_requests(id) ON DELETE SET NULL;
