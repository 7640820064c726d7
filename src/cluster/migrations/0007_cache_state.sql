-- The pull-through cache's own state, shared by every replica: which images it holds is
-- `repo_manifests` with `pushed = false` (their blobs linked `pushed = false`), each cache tag's
-- last confirmation upstream is `tags.checked_at`, pulls are `cache_access` (keyed by the
-- manifest's digest), and pins are below. 0001's `pins` was never used: it could not say why a
-- digest is pinned nor which platforms a pin keeps.
DROP TABLE pins;

-- A pinned digest, once per reason: '@' (pinned by digest) or ':TAG' (made by the pin of TAG,
-- and moved along with it). `platforms` (`os/arch[/variant]`) keeps only those children of an
-- index; empty keeps the whole image.
CREATE TABLE cache_pins (
    repo_id   bigint NOT NULL REFERENCES repositories (id) ON DELETE CASCADE,
    digest    text NOT NULL,
    reason    text NOT NULL,
    platforms text[] NOT NULL DEFAULT '{}',
    pinned_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (repo_id, digest, reason)
);

-- A pinned tag: never forgotten when the upstream drops it, and every digest it moves to is
-- pinned (reason ':TAG') in the move's transaction.
CREATE TABLE cache_tag_pins (
    repo_id   bigint NOT NULL REFERENCES repositories (id) ON DELETE CASCADE,
    tag       text NOT NULL,
    platforms text[] NOT NULL DEFAULT '{}',
    pinned_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (repo_id, tag)
);

-- Eviction walks cached images of a repository and pulls by age.
CREATE INDEX repo_manifests_cached ON repo_manifests (repo_id, digest) WHERE NOT pushed;
