-- 100k public entries with ids pgbench scripts can compute: md5('bench-entry-' || n).
INSERT INTO entries (entry_id, author_id, root_entry_id, depth, branch_order, tree_path, type, title,
                     content, privacy, tags, metadata)
SELECT id, 'bench-author', id, 0, 0, '{}', 'post', 'bench', 'bench entry', 'public', '{}', '{}'
FROM generate_series(1, 100000) n, CAST(md5('bench-entry-' || n) AS uuid) AS id
ON CONFLICT DO NOTHING;
ANALYZE entries;
