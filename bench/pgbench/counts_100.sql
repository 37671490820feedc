-- GetInteractionCounts for 100 entries, the hot one among them.
\set first random(1, 99900)
SELECT count(*) FROM entry_counts(ARRAY(SELECT md5('bench-entry-' || n)::uuid
                                       FROM generate_series(:first, :first + 98) n) || md5('bench-entry-1')::uuid,
                                  NULL);
