-- Console sign-ins, shared by every replica so a browser behind a load balancer that does not
-- pin it stays signed in whichever replica answers. `id` is SHA-256 of the cookie value (the
-- table never holds a usable cookie); `mark` names the credential the session was opened with
-- ("p:<fingerprint of the password hash>" or "t:<access token id>"), re-checked on every
-- request. Sign-out deletes the row; expired rows are deleted by the next sign-in.
CREATE TABLE console_sessions (
    id         bytea PRIMARY KEY,
    subject    text NOT NULL,
    csrf       text NOT NULL,
    mark       text,
    expires_at timestamptz NOT NULL
);
CREATE INDEX console_sessions_by_subject ON console_sessions (subject, expires_at);
CREATE INDEX console_sessions_by_expiry ON console_sessions (expires_at);
