-- Wrap-up time (inbound.wrapup_seconds): an agent whose call ended a moment ago is not rung again at once.
-- last_call_ended_at moves on every answered call, like last_call_at, so the directory trigger of sql/007
-- must not NOTIFY for it either (every process would drop its cached groups on every call).
-- Never edit after it has landed: add a new file.

ALTER TABLE employees ADD COLUMN last_call_ended_at timestamptz;

DROP TRIGGER employees_changed ON employees;
CREATE TRIGGER employees_changed AFTER UPDATE ON employees FOR EACH ROW
    WHEN (to_jsonb(OLD) - 'last_call_at' - 'last_call_ended_at'
          IS DISTINCT FROM to_jsonb(NEW) - 'last_call_at' - 'last_call_ended_at')
    EXECUTE FUNCTION shopcall_directory_changed();
