-- Voicemail messages and the outgoing mail queue (outbox) that notifies group owners of them.
-- Never edit after it has landed: add a new numbered file.

CREATE TABLE voicemails (
    id                bigserial PRIMARY KEY,
    -- the call row is written when the flow ends, usually after the message is stored:
    -- call_uniqueid is what we know at once, call_id is filled by the trigger below
    call_id           bigint REFERENCES calls(id) ON DELETE SET NULL,
    call_uniqueid     text NOT NULL DEFAULT '',
    caller_number     text NOT NULL DEFAULT '',
    caller_e164       text,
    caller_name       text NOT NULL DEFAULT '',
    group_id          integer REFERENCES groups(id) ON DELETE SET NULL,
    group_name        text NOT NULL DEFAULT '',
    -- the group owner the notice goes to (NULL: no group, no owner)
    employee_id       integer REFERENCES employees(id) ON DELETE SET NULL,
    path              text NOT NULL,
    seconds           real NOT NULL CHECK (seconds >= 0),
    transcript        text,
    transcript_engine text,
    transcript_error  text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    -- queued: notice in the outbox | notified: notice sent
    -- no_group / no_owner / no_email: nobody to notify, kept for the web UI and stats
    -- mail_failed: the mail server refused the notice for good (see outbox.last_error)
    status            text NOT NULL
                      CHECK (status IN ('queued', 'notified', 'no_group', 'no_owner', 'no_email', 'mail_failed')),
    -- one row per recording: a replayed spool entry is not stored twice
    UNIQUE (path)
);
CREATE INDEX voicemails_created_idx ON voicemails (created_at);
CREATE INDEX voicemails_call_uniqueid_idx ON voicemails (call_uniqueid);
CREATE INDEX voicemails_group_idx ON voicemails (group_id, created_at DESC);

CREATE FUNCTION voicemails_link_call() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE voicemails SET call_id = NEW.id WHERE call_uniqueid = NEW.uniqueid AND call_id IS NULL;
    RETURN NULL;
END $$;
CREATE TRIGGER calls_link_voicemails AFTER INSERT ON calls
    FOR EACH ROW EXECUTE FUNCTION voicemails_link_call();

CREATE TABLE outbox (
    id           bigserial PRIMARY KEY,
    to_addr      text NOT NULL CHECK (to_addr <> ''),
    subject      text NOT NULL,
    body         text NOT NULL,
    -- ["/var/lib/shopcall/spool/voicemail/....wav", ...]
    attachments  jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(attachments) = 'array'),
    -- pending: to send (again) at next_try_at | sent | failed: refused for good (5xx), not retried
    status       text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'failed')),
    attempts     integer NOT NULL DEFAULT 0,
    last_error   text,
    next_try_at  timestamptz NOT NULL DEFAULT now(),
    created_at   timestamptz NOT NULL DEFAULT now(),
    sent_at      timestamptz,
    voicemail_id bigint REFERENCES voicemails(id) ON DELETE SET NULL
);
CREATE INDEX outbox_due_idx ON outbox (next_try_at) WHERE status = 'pending';
CREATE INDEX outbox_voicemail_idx ON outbox (voicemail_id);
