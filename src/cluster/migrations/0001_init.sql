-- The cluster profile's shared state: everything replicas must agree on. Blob bytes live in the
-- bucket; each replica's data_dir holds only its local read cache. Digests are text
-- ("sha256:<hex>"); times are the database's (timestamptz, now()).

-- Repositories: private projects and pull-through cache alike.
CREATE TABLE repositories (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name       text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Blobs whose bytes are in the bucket, verified (a row exists only after the object does).
CREATE TABLE blobs (
    digest     text PRIMARY KEY,
    size       bigint NOT NULL CHECK (size >= 0),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Which repository may see which blob; `pushed` is false for cache fills.
CREATE TABLE repo_blobs (
    repo_id   bigint NOT NULL REFERENCES repositories (id) ON DELETE CASCADE,
    digest    text NOT NULL REFERENCES blobs (digest),
    linked_at timestamptz NOT NULL DEFAULT now(),
    pushed    boolean NOT NULL,
    PRIMARY KEY (repo_id, digest)
);
CREATE INDEX repo_blobs_by_digest ON repo_blobs (digest);

-- Manifests, byte-exact: the digest is over `body` as stored.
CREATE TABLE manifests (
    digest        text PRIMARY KEY,
    media_type    text NOT NULL,
    body          bytea NOT NULL,
    subject       text,
    artifact_type text,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- What a manifest references: blobs (config, layers) and child manifests (indexes). GC walks
-- these; a blob referenced here is never collected.
CREATE TABLE manifest_blobs (
    manifest_digest text NOT NULL REFERENCES manifests (digest) ON DELETE CASCADE,
    blob_digest     text NOT NULL,
    PRIMARY KEY (manifest_digest, blob_digest)
);
CREATE INDEX manifest_blobs_by_blob ON manifest_blobs (blob_digest);
CREATE TABLE manifest_children (
    manifest_digest text NOT NULL REFERENCES manifests (digest) ON DELETE CASCADE,
    child_digest    text NOT NULL,
    PRIMARY KEY (manifest_digest, child_digest)
);

-- A manifest present in a repository (pushed or filled from the upstream).
CREATE TABLE repo_manifests (
    repo_id   bigint NOT NULL REFERENCES repositories (id) ON DELETE CASCADE,
    digest    text NOT NULL REFERENCES manifests (digest),
    pushed    boolean NOT NULL,
    linked_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (repo_id, digest)
);

-- Tags. A move is one transaction (row lock, update, history row): concurrent writers end with
-- one winner every replica reads. `checked_at` is when a cache tag was last confirmed upstream.
CREATE TABLE tags (
    repo_id    bigint NOT NULL REFERENCES repositories (id) ON DELETE CASCADE,
    tag        text NOT NULL,
    digest     text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    checked_at timestamptz,
    PRIMARY KEY (repo_id, tag)
);

-- Every move of a tag, newest last; `previous` is NULL when the tag was created.
CREATE TABLE tag_history (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    repo_id  bigint NOT NULL REFERENCES repositories (id) ON DELETE CASCADE,
    tag      text NOT NULL,
    digest   text,
    previous text,
    at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tag_history_by_tag ON tag_history (repo_id, tag, id);

-- Referrers API: manifests whose subject is `subject`.
CREATE TABLE referrers (
    repo_id       bigint NOT NULL REFERENCES repositories (id) ON DELETE CASCADE,
    subject       text NOT NULL,
    digest        text NOT NULL,
    artifact_type text,
    PRIMARY KEY (repo_id, subject, digest)
);

-- Push upload sessions, resumable on any replica: the bucket's multipart upload, the parts
-- done so far, and the hash state up to `byte_offset` (the part being filled is kept by the
-- replica serving it and re-read from the completed parts' bytes if another takes over).
CREATE TABLE upload_sessions (
    id              uuid PRIMARY KEY,
    repo_id         bigint NOT NULL REFERENCES repositories (id) ON DELETE CASCADE,
    client          text NOT NULL,
    object_key      text NOT NULL,
    s3_upload_id    text,
    byte_offset     bigint NOT NULL DEFAULT 0,
    hash_algorithm  text NOT NULL DEFAULT 'sha256',
    hash_state      bytea,
    started_at      timestamptz NOT NULL DEFAULT now(),
    touched_at      timestamptz NOT NULL DEFAULT now(),
    -- The replica currently appending (a PATCH holds it; another waits or takes over after
    -- `held_until`).
    holder          text,
    held_until      timestamptz
);
CREATE INDEX upload_sessions_by_touch ON upload_sessions (touched_at);
CREATE TABLE upload_parts (
    session_id  uuid NOT NULL REFERENCES upload_sessions (id) ON DELETE CASCADE,
    part_number integer NOT NULL CHECK (part_number BETWEEN 1 AND 10000),
    etag        text NOT NULL,
    size        bigint NOT NULL,
    PRIMARY KEY (session_id, part_number)
);

-- Identities (users, keys, access and refresh tokens, members) as the auth layer's opaque
-- records, keyed like the local profile's.
CREATE TABLE identity_records (
    kind  text NOT NULL,
    id    text NOT NULL,
    value bytea NOT NULL,
    PRIMARY KEY (kind, id)
);

-- The one token signing key (PKCS#8 P-256), created by the first replica that needs it, so a
-- token issued by one replica verifies on all.
CREATE TABLE token_signing_key (
    id         smallint PRIMARY KEY CHECK (id = 1),
    pkcs8      bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Pull records of the cache (eviction picks the least recently pulled).
CREATE TABLE cache_access (
    repo_id     bigint NOT NULL REFERENCES repositories (id) ON DELETE CASCADE,
    digest      text NOT NULL,
    last_pulled timestamptz NOT NULL,
    pulls       bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (repo_id, digest)
);
CREATE INDEX cache_access_by_age ON cache_access (last_pulled);

-- Pins: a tag or digest the cache keeps regardless of eviction (and serves if the upstream
-- drops it).
CREATE TABLE pins (
    repo_id    bigint NOT NULL REFERENCES repositories (id) ON DELETE CASCADE,
    reference  text NOT NULL,
    digest     text,
    pinned_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (repo_id, reference)
);

-- Registry events in commit order; each endpoint's cursor and dead letters.
CREATE TABLE event_outbox (
    seq    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at     timestamptz NOT NULL DEFAULT now(),
    record bytea NOT NULL
);
CREATE TABLE event_cursors (
    endpoint text PRIMARY KEY,
    seq      bigint NOT NULL
);
CREATE TABLE event_dead_letters (
    endpoint text NOT NULL,
    seq      bigint NOT NULL,
    reason   text NOT NULL,
    at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (endpoint, seq)
);

-- Cold fills: one replica per digest fetches from the upstream; the others stream from
-- `owner` (its internal URL). A lease past `expires_at` may be taken over; `lease_id` fences a
-- previous owner's renewals and release.
CREATE TABLE fill_leases (
    digest      text PRIMARY KEY,
    owner       text NOT NULL,
    lease_id    uuid NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);

-- Cluster-wide jobs (GC, eviction): one replica at a time, by the same lease rule.
CREATE TABLE job_leases (
    job        text PRIMARY KEY,
    owner      text NOT NULL,
    lease_id   uuid NOT NULL,
    expires_at timestamptz NOT NULL
);
