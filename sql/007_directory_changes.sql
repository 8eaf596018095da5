-- Tell every shopcall process when the groups a call rings may have changed, so each can keep groups and
-- their available members in memory (shopcall/group_cache.py) instead of asking on every call: a NOTIFY
-- on channel shopcall_directory, payload the table's name, delivered when the change commits.
-- What moves on every call is left out: a round-robin group's rr_position, an employee's last_call_at
-- (groups whose order hangs on those are never kept). Never edit after it has landed: add a new file.

CREATE FUNCTION shopcall_directory_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('shopcall_directory', TG_TABLE_NAME);  -- repeats within a transaction fold into one
    RETURN NULL;
END $$;

-- WHEN is checked without calling the function: the per-call updates cost PostgreSQL next to nothing
CREATE TRIGGER groups_changed AFTER UPDATE ON groups FOR EACH ROW
    WHEN (to_jsonb(OLD) - 'rr_position' IS DISTINCT FROM to_jsonb(NEW) - 'rr_position')
    EXECUTE FUNCTION shopcall_directory_changed();
CREATE TRIGGER groups_added_removed AFTER INSERT OR DELETE OR TRUNCATE ON groups
    FOR EACH STATEMENT EXECUTE FUNCTION shopcall_directory_changed();

CREATE TRIGGER group_members_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON group_members
    FOR EACH STATEMENT EXECUTE FUNCTION shopcall_directory_changed();

CREATE TRIGGER employees_changed AFTER UPDATE ON employees FOR EACH ROW
    WHEN (to_jsonb(OLD) - 'last_call_at' IS DISTINCT FROM to_jsonb(NEW) - 'last_call_at')
    EXECUTE FUNCTION shopcall_directory_changed();
CREATE TRIGGER employees_added_removed AFTER INSERT OR DELETE OR TRUNCATE ON employees
    FOR EACH STATEMENT EXECUTE FUNCTION shopcall_directory_changed();
