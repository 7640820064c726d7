-- Every change of an identity record (a user, key, token or membership created, changed or
-- deleted by any replica) is announced on the channel `transship_identity_records` as the JSON
-- array [kind, id]; replicas LISTEN and re-read that record, so a credential created or revoked
-- through one replica takes effect on the others within a round trip (src/cluster/identity_records.rs).
-- The payload never carries the value: listeners read the row as it is when they get to it.
-- NOTIFY is sent at commit and only then, so a rolled-back change announces nothing.
CREATE FUNCTION identity_records_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('transship_identity_records', json_build_array(OLD.kind, OLD.id)::text);
    ELSE
        PERFORM pg_notify('transship_identity_records', json_build_array(NEW.kind, NEW.id)::text);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER identity_records_notify
    AFTER INSERT OR UPDATE OR DELETE ON identity_records
    FOR EACH ROW EXECUTE FUNCTION identity_records_notify();
