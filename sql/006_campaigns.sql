-- Outbound robot campaigns (issue 4): what the shop tells us (events), whom we may call (do-not-call,
-- consent, blacklist), what to call about (dial_jobs, one per contact and reason), each dial
-- (dial_attempts), the scripts the shop edits, and the webhooks that carry results back.
-- Never edit after it has landed: add a new numbered file.

ALTER TABLE customers
    ADD COLUMN blacklisted boolean NOT NULL DEFAULT false,  -- the shop's own "never call" flag
    ADD COLUMN updated_at  timestamptz NOT NULL DEFAULT now();

-- numbers that pressed 9 (or were put there by the shop): never dialled by a campaign again
CREATE TABLE do_not_call (
    phone      text PRIMARY KEY CHECK (phone ~ '^\+[1-9][0-9]{6,14}$'),
    source     text NOT NULL,            -- dtmf | api | import | cli
    job_id     bigint,                   -- the robot call where 9 was pressed
    created_at timestamptz NOT NULL DEFAULT now()
);

-- the latest word of the customer per purpose: ad (promotions) needs a grant, service calls do not
CREATE TABLE consents (
    phone      text NOT NULL CHECK (phone ~ '^\+[1-9][0-9]{6,14}$'),
    purpose    text NOT NULL CHECK (purpose IN ('ad', 'service')),
    granted    boolean NOT NULL,
    source     text NOT NULL DEFAULT 'api',
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (phone, purpose)
);

-- "tell me when it is back": stock_arrived calls these
CREATE TABLE stock_subscriptions (
    phone        text NOT NULL CHECK (phone ~ '^\+[1-9][0-9]{6,14}$'),
    sku          text NOT NULL CHECK (sku <> ''),
    product_name text NOT NULL DEFAULT '',
    product_url  text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    notified_at  timestamptz,           -- a back-in-stock job was made; a new subscription resets it
    PRIMARY KEY (phone, sku)
);
CREATE INDEX stock_subscriptions_sku_idx ON stock_subscriptions (sku) WHERE notified_at IS NULL;

-- every event the shop sent, once: the idempotency key makes a repeat a no-op that returns the first result
CREATE TABLE events (
    id              bigserial PRIMARY KEY,
    idempotency_key text NOT NULL UNIQUE CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    type            text NOT NULL,
    payload         jsonb NOT NULL,
    result          jsonb NOT NULL DEFAULT '{}',
    received_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE campaigns (
    name              text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_-]{0,62}$'),
    scenario          text NOT NULL
                      CHECK (scenario IN ('cart_followup', 'back_in_stock', 'order_confirmation', 'delivery_status')),
    purpose           text NOT NULL CHECK (purpose IN ('ad', 'service')),
    enabled           boolean NOT NULL DEFAULT true,
    pbx               text NOT NULL DEFAULT 'asterisk' CHECK (pbx IN ('asterisk', 'freeswitch')),
    caller_id         text CHECK (caller_id ~ '^\+?[0-9]{3,20}$'),  -- shown to the customer
    group_name        text,             -- operators for "yes"/"connect", and for calls back to caller_id
    -- scenario knobs (delay_hours, discount_percent, yes_action, addons, offers_per_year, ...)
    settings          jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(settings) = 'object'),
    max_concurrent    integer NOT NULL DEFAULT 5 CHECK (max_concurrent BETWEEN 1 AND 1000),
    calls_per_second  real NOT NULL DEFAULT 2 CHECK (calls_per_second > 0 AND calls_per_second <= 500),
    max_attempts      integer NOT NULL DEFAULT 3 CHECK (max_attempts BETWEEN 1 AND 20),
    max_attempts_per_day integer NOT NULL DEFAULT 2 CHECK (max_attempts_per_day BETWEEN 1 AND 20),
    -- minutes to wait before the next attempt, by the last outcome; a missing outcome means "finish"
    retry_minutes     jsonb NOT NULL DEFAULT '{"busy": 10, "no_answer": 30, "failed": 60, "machine": 120,
                                              "hangup": 60, "lost": 15}',
    ring_seconds      integer NOT NULL DEFAULT 30 CHECK (ring_seconds BETWEEN 5 AND 120),
    amd               boolean NOT NULL DEFAULT false,  -- Asterisk's AMD() before the robot speaks
    -- when the callee may be called, in the callee's own time zone
    calling_window    jsonb NOT NULL DEFAULT
        '{"mon":[["09:00","21:00"]],"tue":[["09:00","21:00"]],"wed":[["09:00","21:00"]],
          "thu":[["09:00","21:00"]],"fri":[["09:00","21:00"]],"sat":[["10:00","20:00"]],"sun":[["10:00","20:00"]]}',
    next_dial_at      timestamptz,      -- the calls_per_second slot shared by every dialler worker
    updated_at        timestamptz NOT NULL DEFAULT now()
);

INSERT INTO campaigns (name, scenario, purpose, settings) VALUES
    ('cart_followup', 'cart_followup', 'ad',
     '{"delay_hours": 72, "discount_percent": 25, "yes_action": "callback", "offers_per_year": 3}'),
    ('back_in_stock', 'back_in_stock', 'service', '{}'),
    ('order_confirmation', 'order_confirmation', 'service', '{"addons": []}'),
    ('delivery_status', 'delivery_status', 'service', '{}');

-- the words of each scenario, per customer segment and language: Jinja2, checked when saved
CREATE TABLE scripts (
    scenario   text NOT NULL,
    segment    text NOT NULL DEFAULT 'default',
    language   text NOT NULL DEFAULT 'ru' CHECK (language IN ('ru', 'en')),
    part       text NOT NULL,
    template   text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scenario, segment, language, part)
);

-- one row per contact and reason ("call +7916… about cart 881"); its dials are dial_attempts
CREATE TABLE dial_jobs (
    id           bigserial PRIMARY KEY,
    campaign     text NOT NULL REFERENCES campaigns(name) ON UPDATE CASCADE,
    phone        text NOT NULL CHECK (phone ~ '^\+[1-9][0-9]{6,14}$'),
    customer_id  integer REFERENCES customers(id) ON DELETE SET NULL,
    order_number text,
    sku          text,
    -- what the script may say: product, order, pickup point, discount, ...
    context      jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(context) = 'object'),
    event_id     bigint REFERENCES events(id) ON DELETE SET NULL,
    dedupe_key   text NOT NULL,        -- one open job per key: a second cart event does not call twice
    -- pending → dialling (claimed, originate sent) → in_call (the robot talks) → done | pending | failed
    -- cancelled: not to be called (do-not-call, blacklist, no consent, ordered meanwhile, ...)
    status       text NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'dialling', 'in_call', 'done', 'failed', 'cancelled')),
    attempts     integer NOT NULL DEFAULT 0,
    due_at       timestamptz NOT NULL DEFAULT now(),
    claimed_at   timestamptz,
    claimed_by   text,
    result       text,                 -- yes | no | no_input | opted_out | confirmed | connected | reminded ...
    reason       text,                 -- why it ended or waits: max_attempts, dnc, no_consent, window, ...
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);
CREATE UNIQUE INDEX dial_jobs_open_key_idx ON dial_jobs (dedupe_key)
    WHERE status IN ('pending', 'dialling', 'in_call');
CREATE INDEX dial_jobs_due_idx ON dial_jobs (due_at) WHERE status = 'pending';
CREATE INDEX dial_jobs_busy_idx ON dial_jobs (campaign) WHERE status IN ('dialling', 'in_call');
CREATE INDEX dial_jobs_phone_idx ON dial_jobs (phone, created_at DESC);
CREATE INDEX dial_jobs_order_idx ON dial_jobs (order_number) WHERE order_number IS NOT NULL;

CREATE TABLE dial_attempts (
    id          bigserial PRIMARY KEY,
    job_id      bigint NOT NULL REFERENCES dial_jobs(id) ON DELETE CASCADE,
    number      integer NOT NULL,     -- 1 for the first dial of the job, ...
    worker      text NOT NULL,        -- host:pid of the dialler that sent the Originate
    action_id   text NOT NULL UNIQUE,
    uniqueid    text NOT NULL UNIQUE, -- the channel's id, given by us (Originate ChannelId)
    started_at  timestamptz NOT NULL,
    answered_at timestamptz,
    ended_at    timestamptz,
    -- answered | busy | no_answer | failed | machine | hangup | lost (the dialler died, nothing on the PBX)
    outcome     text,
    result      text,
    detail      jsonb NOT NULL DEFAULT '{}',
    UNIQUE (job_id, number)
);
CREATE INDEX dial_attempts_started_idx ON dial_attempts (started_at);

-- results (and product links) to the shop's URLs: HMAC-signed, retried with back-off until a 2xx
CREATE TABLE webhook_outbox (
    id          bigserial PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('result', 'message')),
    url         text NOT NULL CHECK (url ~ '^https?://'),
    body        jsonb NOT NULL,
    dedupe_key  text UNIQUE,          -- e.g. attempt:17: a replayed settlement does not post twice
    status      text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent')),
    attempts    integer NOT NULL DEFAULT 0,
    next_try_at timestamptz NOT NULL DEFAULT now(),
    last_error  text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    sent_at     timestamptz
);
CREATE INDEX webhook_outbox_due_idx ON webhook_outbox (next_try_at) WHERE status = 'pending';
