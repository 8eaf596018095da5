-- Every finished call can be posted to the shop's CRM (webhooks.calls_url): a 'call' row in the same
-- outbox as the robot's results, queued in the statement that saves the call. Never edit after it has
-- landed: add a new file.

ALTER TABLE webhook_outbox DROP CONSTRAINT webhook_outbox_kind_check,
    ADD CONSTRAINT webhook_outbox_kind_check CHECK (kind IN ('result', 'message', 'call'));
