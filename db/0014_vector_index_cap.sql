-- A cap on the per-user vector indexes (issue 11).
--
-- Search exactly up to search_exact_max_memories (now 2000 by default: an
-- exact scan of 10k memories of 384 dimensions costs ~10 ms of CPU, too much
-- for a 20 ms p99 on a shared machine); above it, a user's own IVFFlat index.
-- A lower threshold means more such indexes, and every index on memories
-- costs every query and write on memories: the planner opens and locks each
-- one, an INSERT locks each one and tests its predicate. So maintenance keeps
-- indexes for the p_max_indexes largest users only (the service's
-- vector_index_max_users); others above the threshold are searched exactly
-- (memory_vector_index_usable is false without a ready index), and the index
-- of a user who is no longer among the largest is dropped.

DROP FUNCTION memory_vector_indexes_due(integer);

-- The vector-index DDL due, drops first: (index, user, statements), the user
-- NULL for a drop. Builds and rebuilds as in 0006 / 0011. Read in two
-- statements because memory_users is distributed and the catalogs are local
-- to the node running maintenance (see 0011).
CREATE FUNCTION memory_vector_indexes_due(p_min_memories integer, p_max_indexes integer)
RETURNS TABLE (index_name text, user_id text, statements text[])
LANGUAGE plpgsql STABLE AS $$
DECLARE
    big_users  text[];
    big_counts integer[];
BEGIN
    SELECT coalesce(array_agg(b.user_id ORDER BY b.memory_count DESC, b.user_id), '{}'),
           array_agg(b.memory_count ORDER BY b.memory_count DESC, b.user_id)
    INTO big_users, big_counts
    FROM (SELECT u.user_id, u.memory_count FROM memory_users u WHERE u.memory_count > p_min_memories
          ORDER BY u.memory_count DESC, u.user_id LIMIT p_max_indexes) b;
    RETURN QUERY
    SELECT c.relname::text, NULL::text, ARRAY[format('DROP INDEX CONCURRENTLY IF EXISTS %I', c.relname)]
    FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
    WHERE i.indrelid = 'memories'::regclass
      -- the shape of memory_vector_index_name: its prefix and an md5 in hex
      AND c.relname::text ~ ('^' || left(memory_vector_index_name(''), -32) || '[0-9a-f]{32}$')
      AND c.relname::text <> ALL (SELECT memory_vector_index_name(b) FROM unnest(big_users) b)
    ORDER BY 1;
    RETURN QUERY
    SELECT sized.name, big.name_of_user,
           CASE
               WHEN i.indexrelid IS NULL THEN ARRAY[ddl.build]
               WHEN NOT (i.indisvalid AND i.indisready)
                   THEN ARRAY[format('DROP INDEX CONCURRENTLY IF EXISTS %I', sized.name), ddl.build]
               ELSE ARRAY[format('ALTER INDEX %I SET (lists = %s)', sized.name, sized.lists),
                          format('REINDEX INDEX CONCURRENTLY %I', sized.name)]
           END
    FROM unnest(big_users, big_counts) WITH ORDINALITY AS big(name_of_user, memory_count, rank)
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
