-- A cap on the per-user vector indexes (issue 11).
--
-- Search exactly up to search_exact_max_memories (now 2000 by default: an
-- exact scan of 10k memories of 384 dimensions costs ~10 ms of CPU, too much
-- for a 20 ms p99 on a shared machine); above it, a user's own IVFFlat index.
-- A lower threshold means more such indexes, and every index on memories
-- costs every query and write on memories: the planner opens and locks each
-- one, an INSERT locks each one and tests its predicate. So maintenance keeps
-- indexes for p_max_indexes users only (the service's vector_index_max_users);
-- others above the threshold are searched exactly (memory_vector_index_usable
-- is false without a ready index).
--
-- Which users: the largest, where a user who has an index counts 1.25 times
-- their memories. Without that margin two users growing side by side at the
-- edge of the cap would swap places run after run, each swap a concurrent
-- drop and a concurrent build (two scans of memories); with it, a newcomer
-- takes the place of the smallest indexed user once 25% larger.
--
-- An index, once built, stays until its user falls to 80% of the threshold:
-- otherwise a user hovering around it (one delete below, one create above)
-- would have it dropped and built again run after run, each build a scan of
-- memories. In between, search goes exact (memory_vector_index_usable asks
-- for more than the threshold), and such a kept index takes one of the capped
-- places only while no user above the threshold wants it.
--
-- The one-argument memory_vector_indexes_due is dropped rather than kept
-- beside the new one: a replica still running the old version would build
-- again what the new ones drop. During a rollout, old replicas' vector-index
-- job fails (logged as vector_index_failed) until they are replaced.

DROP FUNCTION memory_vector_indexes_due(integer);

-- The vector-index DDL due, drops first: (action, index, user, statements)
-- with action 'drop' (an index of a user no longer chosen, or the remains of
-- a failed REINDEX CONCURRENTLY: name_ccnew / name_ccold; user NULL),
-- 'build', 'repair' (an invalid index dropped and built again) or 'rebuild'
-- (new lists for a user who outgrew them, see 0006; or again after a failed
-- REINDEX CONCURRENTLY, whose name_ccnew is dropped first: the lists were
-- already set, so the index reports sizes it was not built with). Users are
-- read in a statement of their own because memory_users is distributed and
-- the catalogs are local to the node running maintenance (see 0011).
CREATE FUNCTION memory_vector_indexes_due(p_min_memories integer, p_max_indexes integer)
RETURNS TABLE (action text, index_name text, user_id text, statements text[])
LANGUAGE plpgsql STABLE AS $$
DECLARE
    keep_margin CONSTANT double precision := 1.25;  -- a user who has an index counts this many times (see above)
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
          OR EXISTS (SELECT FROM pg_index f JOIN pg_class c ON c.oid = f.indexrelid
                     WHERE f.indrelid = 'memories'::regclass AND c.relname::text ~ ('^' || sized.name || '_ccnew[0-9]*$'))
    ORDER BY big.rank;
END $$;
