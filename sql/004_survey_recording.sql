-- Post-call survey answers and the recording policy beyond the employee's own.

CREATE TABLE survey_answers (
    id          bigserial PRIMARY KEY,
    call_id     bigint NOT NULL UNIQUE REFERENCES calls(id) ON DELETE CASCADE,
    employee_id integer REFERENCES employees(id) ON DELETE SET NULL,
    group_id    integer REFERENCES groups(id) ON DELETE SET NULL,
    -- 1 solved, 2 had to call several times, 3 not solved
    answer      smallint NOT NULL CHECK (answer BETWEEN 1 AND 3),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- a group or a number may impose a policy; NULL = the answering employee's own policy decides
ALTER TABLE groups ADD COLUMN recording_policy text CHECK (recording_policy IN ('always', 'never', 'on_demand'));
ALTER TABLE numbers ADD COLUMN recording_policy text CHECK (recording_policy IN ('always', 'never', 'on_demand'));
ALTER TABLE calls ADD COLUMN recording_purged_at timestamptz;
