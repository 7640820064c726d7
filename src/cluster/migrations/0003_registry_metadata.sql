-- The private registry's metadata queries: what the referrers API returns, and listings in byte
-- order whatever collation the database was created with.

-- The descriptor the referrers API returns for each referrer (JSON text, as built when the
-- manifest was pushed). Nothing wrote `referrers` before this version, so the table is empty.
ALTER TABLE referrers ADD COLUMN descriptor text NOT NULL;

-- Tag lists and the catalog page in "C" (byte) order: these indexes serve `ORDER BY ... COLLATE
-- "C"` and the `> last` bound without sorting.
CREATE INDEX repositories_by_name_c ON repositories (name COLLATE "C");
CREATE INDEX tags_by_tag_c ON tags (repo_id, tag COLLATE "C");

-- The tags naming a manifest (deleting a manifest deletes them; the tags of a digest).
CREATE INDEX tags_by_digest ON tags (repo_id, digest);
