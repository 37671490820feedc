-- Per-user vector indexes are kept down to 80% of the exact-search threshold
-- (issue 11 review).
--
-- 0014 chose users above search_exact_max_memories only, so a user hovering
-- around it (2000 by default: one delete below, one create above) had their
-- index dropped and built again by maintenance run after run, each build a
-- scan of memories. Now an index, once built, stays until its user falls
-- below 0.8 times the threshold; in between, search goes exact as before
-- (memory_vector_index_usable still asks for more than the threshold). Such a
-- kept index takes one of the capped places only while no user above the
-- threshold wants it. Among users above it, the cap and its 1.25 keep-margin
-- are as in 0014.

CREATE OR REPLACE FUNCTION memory_vector_indexes_due(p_min_memories integer, p_max_indexes integer)
RETURNS TABLE (action text, index_name text, user_id text, statements text[])
LANGUAGE plpgsql STABLE AS $$
DECLARE
    keep_margin CONSTANT double precision := 1.25;  -- a user who has an index counts this many times (see 0014)
    keep_floor  CONSTANT double precision := 0.8;   -- an index is kept down to this share of p_min_memories
    big_users  text[];
    big_counts integer[];
    chosen     text[];
    chosen_counts integer[];
BEGIN
    SELECT coalesce(array_agg(u.user_id), '{}'), coalesce(array_agg(u.memory_count), '{}')
    INTO big_users, big_counts
    FROM memory_users u WHERE u.memory_count > floor(keep_floor * p_min_memories);
    -- Apart from the statement above: memory_users is distributed, the catalogs are local (see 0011).
    SELECT coalesce(array_agg(b.name_of_user), '{}'), coalesce(array_agg(b.memory_count), '{}')
    INTO big_users, big_counts
    FROM unnest(big_users, big_counts) b(name_of_user, memory_count)
    WHERE b.memory_count > p_min_memories OR memory_vector_index_ready(b.name_of_user);
    SELECT coalesce(array_agg(c.name_of_user ORDER BY c.memory_count DESC, c.name_of_user), '{}'),
           coalesce(array_agg(c.memory_count ORDER BY c.memory_count DESC, c.name_of_user), '{}')
    INTO chosen, chosen_counts
    FROM (SELECT b.name_of_user, b.memory_count
          FROM unnest(big_users, big_counts) b(name_of_user, memory_count)
          -- Users above the threshold first: a kept index below it (unused by search) yields its place.
          ORDER BY b.memory_count > p_min_memories DESC,
                   b.memory_count * CASE WHEN memory_vector_index_ready(b.name_of_user) THEN keep_margin ELSE 1 END DESC,
                   b.name_of_user
          LIMIT p_max_indexes) c;
    RETURN QUERY
    SELECT 'drop', c.relname::text, NULL::text, ARRAY[format('DROP INDEX CONCURRENTLY IF EXISTS %I', c.relname)]
    FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
    WHERE i.indrelid = 'memories'::regclass
      -- the shape of memory_vector_index_name: its prefix and an md5 in hex
      AND c.relname::text ~ ('^' || left(memory_vector_index_name(''), -32) || '[0-9a-f]{32}(_cc(new|old)[0-9]*)?$')
      AND c.relname::text <> ALL (SELECT memory_vector_index_name(u) FROM unnest(chosen) u)
    ORDER BY 2;
    RETURN QUERY
    SELECT CASE WHEN i.indexrelid IS NULL THEN 'build'
                WHEN NOT (i.indisvalid AND i.indisready) THEN 'repair'
                ELSE 'rebuild' END,
           sized.name, big.name_of_user,
           CASE
               WHEN i.indexrelid IS NULL THEN ARRAY[ddl.build]
               WHEN NOT (i.indisvalid AND i.indisready)
                   THEN ARRAY[format('DROP INDEX CONCURRENTLY IF EXISTS %I', sized.name), ddl.build]
               ELSE ARRAY[format('ALTER INDEX %I SET (lists = %s)', sized.name, sized.lists),
                          format('REINDEX INDEX CONCURRENTLY %I', sized.name)]
           END
    FROM unnest(chosen, chosen_counts) WITH ORDINALITY AS big(name_of_user, memory_count, rank)
    CROSS JOIN LATERAL (SELECT memory_vector_index_name(big.name_of_user) AS name,
                               ceil(sqrt(big.memory_count))::integer AS lists) sized
    CROSS JOIN LATERAL (
        SELECT format('CREATE INDEX CONCURRENTLY %I ON memories USING ivfflat ((embedding::halfvec(%s)) '
                      'halfvec_cosine_ops) WITH (lists = %s) WHERE user_id = %L', sized.name, a.atttypmod, sized.lists,
                      big.name_of_user) AS build
        FROM pg_attribute a WHERE a.attrelid = 'memories'::regclass AND a.attname = 'embedding') ddl
    LEFT JOIN pg_index i ON i.indexrelid = to_regclass(sized.name)
    LEFT JOIN LATERAL (
        SELECT o.option_value::integer AS built_lists
        FROM pg_class c, pg_options_to_table(c.reloptions) o
        WHERE c.oid = i.indexrelid AND o.option_name = 'lists') current ON true
    WHERE i.indexrelid IS NULL OR NOT (i.indisvalid AND i.indisready)
          OR big.memory_count > 4 * current.built_lists * current.built_lists
    ORDER BY big.rank;
END $$;
