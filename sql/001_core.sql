-- shopcall core schema: the directory (employees, groups, numbers, schedules, menus),
-- shop data (customers, orders) and the call log (calls, callback requests).
-- Applied once by `shopcall db migrate`; never edit after it has landed: add a new numbered file.

CREATE TABLE schedules (
    id              serial PRIMARY KEY,
    name            text NOT NULL UNIQUE,
    timezone        text NOT NULL DEFAULT 'Europe/Moscow',
    -- {"mon": [["09:00","18:00"]], ..., "sun": []}; a missing day is closed
    weekly          jsonb NOT NULL DEFAULT
        '{"mon":[["09:00","18:00"]],"tue":[["09:00","18:00"]],"wed":[["09:00","18:00"]],
          "thu":[["09:00","18:00"]],"fri":[["09:00","18:00"]],"sat":[],"sun":[]}',
    holiday_country text DEFAULT 'RU',
    closed_dates    date[] NOT NULL DEFAULT '{}',
    open_dates      date[] NOT NULL DEFAULT '{}',
    override        text CHECK (override IN ('open', 'closed')),
    override_until  timestamptz
);

CREATE TABLE employees (
    id               serial PRIMARY KEY,
    name             text NOT NULL,
    -- the PBX device name; the dial string comes from the PBX's endpoint template
    endpoint         text NOT NULL UNIQUE CHECK (endpoint ~ '^[A-Za-z0-9][A-Za-z0-9_.+-]{0,62}$'),
    mobile           text CHECK (mobile ~ '^\+[1-9][0-9]{6,14}$'),
    email            text,
    language         text NOT NULL DEFAULT 'ru' CHECK (language IN ('ru', 'en')),
    recording_policy text NOT NULL DEFAULT 'always'
                     CHECK (recording_policy IN ('always', 'never', 'on_demand')),
    categories       text[] NOT NULL DEFAULT '{}',
    logged_in        boolean NOT NULL DEFAULT true,
    paused           boolean NOT NULL DEFAULT false,
    last_call_at     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE groups (
    id                serial PRIMARY KEY,
    name              text NOT NULL UNIQUE CHECK (name ~ '^[a-z][a-z0-9_-]{0,62}$'),
    title             text NOT NULL DEFAULT '',
    strategy          text NOT NULL DEFAULT 'ringall'
                      CHECK (strategy IN ('ringall', 'hunt', 'roundrobin', 'leastrecent')),
    ring_timeout      integer NOT NULL DEFAULT 20 CHECK (ring_timeout BETWEEN 1 AND 600),
    owner_employee_id integer REFERENCES employees(id) ON DELETE SET NULL,
    category          text,
    survey_enabled    boolean NOT NULL DEFAULT false,
    rr_position       integer NOT NULL DEFAULT 0
);

CREATE TABLE group_members (
    group_id    integer NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
    employee_id integer NOT NULL REFERENCES employees(id) ON DELETE CASCADE,
    position    integer NOT NULL DEFAULT 0,
    PRIMARY KEY (group_id, employee_id)
);

CREATE TABLE menus (
    id             serial PRIMARY KEY,
    name           text NOT NULL UNIQUE,
    prompt         text NOT NULL DEFAULT 'main_menu',
    -- digit -> group name, e.g. {"1": "sales", "2": "delivery", "3": "accounting"}
    options        jsonb NOT NULL,
    default_choice text NOT NULL DEFAULT '1',
    timeout        real NOT NULL DEFAULT 5 CHECK (timeout > 0),
    retries        integer NOT NULL DEFAULT 2 CHECK (retries BETWEEN 0 AND 10)
);

CREATE TABLE numbers (
    number          text PRIMARY KEY CHECK (number ~ '^\+?[0-9A-Za-z_.-]{1,32}$'),
    title           text NOT NULL DEFAULT '',
    greeting        text NOT NULL DEFAULT 'greeting',
    recording_notice boolean NOT NULL DEFAULT true,
    language        text NOT NULL DEFAULT 'ru' CHECK (language IN ('ru', 'en')),
    category        text,
    group_id        integer REFERENCES groups(id) ON DELETE SET NULL,
    schedule_id     integer REFERENCES schedules(id) ON DELETE SET NULL,
    menu_id         integer REFERENCES menus(id) ON DELETE SET NULL
);

CREATE TABLE customers (
    id              serial PRIMARY KEY,
    phone           text NOT NULL UNIQUE CHECK (phone ~ '^\+[1-9][0-9]{6,14}$'),
    name            text NOT NULL DEFAULT '',
    email           text,
    segment         text NOT NULL DEFAULT 'default',
    language        text CHECK (language IN ('ru', 'en')),
    timezone        text,
    last_manager_id integer REFERENCES employees(id) ON DELETE SET NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE orders (
    id            serial PRIMARY KEY,
    number        text NOT NULL UNIQUE,
    customer_id   integer REFERENCES customers(id) ON DELETE SET NULL,
    status        text NOT NULL DEFAULT 'new',
    -- [{"sku": "...", "name": "...", "size": "...", "qty": 1, "price": "990.00", "category": "..."}]
    items         jsonb NOT NULL DEFAULT '[]',
    total         numeric(12, 2) NOT NULL DEFAULT 0,
    currency      text NOT NULL DEFAULT 'RUB',
    delivery_date date,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX orders_customer_idx ON orders (customer_id, created_at DESC);

CREATE TABLE calls (
    id                bigserial PRIMARY KEY,
    -- the PBX's id of the call (Asterisk uniqueid, FreeSWITCH uuid): one row per call
    uniqueid          text NOT NULL UNIQUE,
    pbx               text NOT NULL DEFAULT 'asterisk',
    direction         text NOT NULL DEFAULT 'inbound' CHECK (direction IN ('inbound', 'outbound')),
    caller_number     text NOT NULL DEFAULT '',
    caller_e164       text,
    caller_name       text NOT NULL DEFAULT '',
    dialled_number    text NOT NULL DEFAULT '',
    customer_id       integer REFERENCES customers(id) ON DELETE SET NULL,
    group_id          integer REFERENCES groups(id) ON DELETE SET NULL,
    menu_choice       text,
    started_at        timestamptz NOT NULL,
    answered_at       timestamptz,
    ended_at          timestamptz,
    answered_by       integer REFERENCES employees(id) ON DELETE SET NULL,
    answered_endpoint text,
    -- answered | missed_no_answer | after_hours | holiday | abandoned | failed
    outcome           text NOT NULL,
    missed            boolean NOT NULL,
    recording_path    text,
    -- each routing step taken, in order, for "why did this call go there"
    route_log         jsonb NOT NULL DEFAULT '[]'
);
CREATE INDEX calls_started_idx ON calls (started_at);
CREATE INDEX calls_caller_idx ON calls (caller_e164, started_at DESC);

CREATE TABLE callback_requests (
    id          bigserial PRIMARY KEY,
    call_id     bigint REFERENCES calls(id) ON DELETE SET NULL,
    phone       text NOT NULL,
    customer_id integer REFERENCES customers(id) ON DELETE SET NULL,
    group_id    integer REFERENCES groups(id) ON DELETE SET NULL,
    reason      text NOT NULL,
    status      text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'in_progress', 'done', 'failed')),
    attempts    integer NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now(),
    due_at      timestamptz NOT NULL DEFAULT now(),
    done_at     timestamptz
);
CREATE INDEX callback_pending_idx ON callback_requests (status, due_at);
-- one open request per phone: a caller who tries five times gets one call back, not five
CREATE UNIQUE INDEX callback_open_phone_idx ON callback_requests (phone)
    WHERE status IN ('pending', 'in_progress');
