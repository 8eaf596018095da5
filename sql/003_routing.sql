-- Routing beyond the menu: product categories behind call-tracking numbers, sticky routing to the last
-- manager, the overflow robot, the language menu; the steps are switched per number.

CREATE TABLE categories (
    name     text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_-]{0,62}$'),
    -- shown to the agent before answering, as a caller-name prefix: "[Встраиваемая] Иван"
    title    text NOT NULL DEFAULT '',
    group_id integer REFERENCES groups(id) ON DELETE SET NULL
);

ALTER TABLE numbers
    ADD COLUMN sticky          boolean NOT NULL DEFAULT true,   -- ring the customer's last manager first
    ADD COLUMN sticky_seconds  integer NOT NULL DEFAULT 15 CHECK (sticky_seconds BETWEEN 1 AND 120),
    ADD COLUMN by_last_category boolean NOT NULL DEFAULT true,  -- then the group of the last order's category
    ADD COLUMN language_menu   boolean NOT NULL DEFAULT false,  -- "1 Russian, 2 English" before the menu
    ADD COLUMN overflow_robot  boolean NOT NULL DEFAULT false,  -- the robot answers when nobody does
    ADD COLUMN overflow_seconds integer CHECK (overflow_seconds BETWEEN 1 AND 600);  -- else the group's timeout

ALTER TABLE calls
    ADD COLUMN language text,
    ADD COLUMN robot_choice text;

-- who was offered a call, for least-recent and to tell "not answered" from "not offered"
ALTER TABLE employees
    ADD COLUMN last_offered_at timestamptz;
