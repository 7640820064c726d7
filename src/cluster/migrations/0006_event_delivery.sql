-- Notifications in the cluster profile: a dead letter keeps its event (the outbox row is
-- pruned once every endpoint is past it) and whether `events retry` asked for it again; one
-- id for the whole cluster prefixes event ids, so a receiver sees the same id whichever
-- replica delivers.
ALTER TABLE event_dead_letters
    ADD COLUMN record bytea NOT NULL DEFAULT '\x'::bytea,
    ADD COLUMN retry boolean NOT NULL DEFAULT false;
CREATE TABLE event_instance (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    id  text NOT NULL
);
