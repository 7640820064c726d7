-- Push sessions any replica can continue (src/cluster/uploads.rs).
--
-- `tail`: the bytes past the last full part. S3 refuses parts under 5 MiB except the last, so a
-- PATCH that ends mid-part leaves bytes no part can hold yet; they are kept here, written in the
-- same transaction as `byte_offset`, `hash_state` and the part rows, so every replica reads one
-- consistent state (a temporary object would need its own ordering and its own garbage).
-- Shorter than one part; EXTERNAL: stored out of line and uncompressed (layer bytes are
-- compressed already), and left in place by the updates that only move `held_until`.
ALTER TABLE upload_sessions ADD COLUMN tail bytea NOT NULL DEFAULT ''::bytea;
ALTER TABLE upload_sessions ALTER COLUMN tail SET STORAGE EXTERNAL;

-- True once the digest is verified and the multipart upload completed into `object_key`: only
-- the copy to the blob's key is left, so a retried finish resumes there and cancel or reap
-- delete that object instead of aborting an upload that no longer exists.
ALTER TABLE upload_sessions ADD COLUMN assembled boolean NOT NULL DEFAULT false;

COMMENT ON COLUMN upload_sessions.hash_state IS
    'hash of the bytes in upload_parts (not of tail), as src/cluster/hash_state.rs saves it; NULL before the first part';
COMMENT ON COLUMN upload_sessions.byte_offset IS
    'sum of upload_parts.size plus length(tail)';
