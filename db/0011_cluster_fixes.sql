-- Fixes found by running every server test on the Citus cluster
-- (NEXUS_TEST_BACKEND=citus, docs/citus.md); the same schema on one node.

-- memory_document takes any row with the memories columns. A query on
-- memories inside a delegated function (get_memory, list_memories, the
-- searches) runs on the worker against the shard table, whose row type is
-- memories_<shardid>: a function declared for the row type `memories` then
-- does not exist there ("function memory_document(memories_102024) does not
-- exist"). A record parameter accepts both; PL/pgSQL, because a SQL function
-- cannot take a record. Callers call it by name and need no change.
DROP FUNCTION memory_document(memories);

CREATE FUNCTION memory_document(m record) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN jsonb_build_object(
        'memory_id', m.memory_id, 'user_id', m.user_id, 'content', m.content,
        'thread_id', m.thread_id, 'session_id', m.session_id, 'memory_trace_id', m.memory_trace_id,
        'gravity_score', m.gravity_score, 'emotion_type', m.emotion_type, 'entities', m.entities,
        'meta_tags', m.meta_tags, 'temporal_type', m.temporal_type, 'identity_anchor', m.identity_anchor,
        'create_time', m.create_time, 'update_time', m.update_time);
END $$;

-- No now() in ON CONFLICT DO UPDATE SET: Citus accepts only IMMUTABLE
-- functions there ("functions used in the DO UPDATE SET clause of INSERTs on
-- distributed tables must be marked IMMUTABLE"). The same time, through a
-- variable.
CREATE OR REPLACE FUNCTION touch_session(p_user_id text, p_session_id text, p_status text) RETURNS memory_sessions
LANGUAGE plpgsql AS $$
DECLARE
    touched_at timestamptz := now();
    touched    memory_sessions;
BEGIN
    INSERT INTO memory_sessions AS s (user_id, session_id, status)
    VALUES (p_user_id, p_session_id, p_status)
    ON CONFLICT ON CONSTRAINT memory_sessions_pkey DO UPDATE
    SET status = EXCLUDED.status, last_message_time = greatest(touched_at, s.last_message_time)
    RETURNING * INTO touched;
    RETURN touched;
END $$;

CREATE OR REPLACE FUNCTION record_pattern(p_user_id text, p_pattern_type text, p_intensity double precision)
RETURNS memory_patterns
LANGUAGE plpgsql AS $$
DECLARE
    recorded_at timestamptz := now();
    recorded    memory_patterns;
BEGIN
    INSERT INTO memory_patterns AS p (user_id, pattern_type, intensity)
    VALUES (p_user_id, p_pattern_type, p_intensity)
    ON CONFLICT ON CONSTRAINT memory_patterns_pkey DO UPDATE
    SET intensity = EXCLUDED.intensity, occurrences = p.occurrences + 1, update_time = recorded_at
    RETURNING * INTO recorded;
    RETURN recorded;
END $$;

-- PL/pgSQL, not SQL: a SQL function whose statements read a distributed table
-- with a parameter cannot be planned by Citus ("parameterized queries for SQL
-- functions referencing distributed tables are not supported"; with a RETURN
-- body, "syntax error at or near RETURN"). Same answers as 0006's.
CREATE OR REPLACE FUNCTION memory_vector_index_usable(p_user_id text, p_exact_max integer) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN coalesce((SELECT u.memory_count > p_exact_max FROM memory_users u WHERE u.user_id = p_user_id), false)
           AND memory_vector_index_ready(p_user_id);
END $$;

-- The vector-index DDL due (see 0006): the large users are read first, in a
-- statement of their own, because memory_users is distributed and the
-- catalogs it was joined with are local to the node running maintenance.
CREATE OR REPLACE FUNCTION memory_vector_indexes_due(p_min_memories integer)
RETURNS TABLE (user_id text, statements text[])
LANGUAGE plpgsql STABLE AS $$
DECLARE
    big_users  text[];
    big_counts integer[];
BEGIN
    SELECT array_agg(u.user_id ORDER BY u.memory_count DESC), array_agg(u.memory_count ORDER BY u.memory_count DESC)
    INTO big_users, big_counts
    FROM memory_users u WHERE u.memory_count > p_min_memories;
    RETURN QUERY
    SELECT big.name_of_user,
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
