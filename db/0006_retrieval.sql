-- Memory retrieval (issue 11): BM25 text search, hybrid search, and vector
-- indexes per large user instead of two HNSW indexes over every user.
--
-- Text: each memory's content and entities as a tsvector (English stemming,
-- stop words dropped) with its length, a GIN index on (user, tsvector), and
-- per-user corpus statistics (memory count and total length) on memory_users,
-- kept exact by the per-user write lock. Term document frequencies are
-- counted at query time over the user's matching memories, so ranking uses
-- that user's corpus only.
--
-- Vectors: a user with at most search_exact_max_memories memories is searched
-- exactly (recall 1). Maintenance gives each larger user a vector index of
-- their own (partial on user_id, over halfvec to halve its size), built
-- concurrently; until it is valid that user is searched exactly too. The
-- index is IVFFlat, not HNSW: built from the user's own rows (k-means over
-- what is there, so not the seed's empty-table IVFFlat problem) it takes
-- seconds where HNSW takes minutes, an insert costs one distance per list
-- instead of a graph search, and on clustered vectors it keeps recall where
-- HNSW loses whole clusters (measured on the bench's 100k user: recall@10
-- 1.00 with 16 of 316 lists probed, against 0.89-0.95 for HNSW at m 16-32
-- with a query at recall 0 in every setting). Its lists are fixed at build
-- time, so maintenance rebuilds it when the user has outgrown them.

CREATE EXTENSION IF NOT EXISTS btree_gin;

-- The text a memory is found by. IMMUTABLE (array_to_string is only STABLE
-- in general, but not for text[]), so it can define a generated column.
CREATE FUNCTION memory_search_vector(p_content text, p_entities text[]) RETURNS tsvector
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN to_tsvector('english'::regconfig, p_content || ' ' || array_to_string(p_entities, ' '));

-- BM25's document length: the tokens kept (stop words do not count).
CREATE FUNCTION tsvector_token_count(p_vector tsvector) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN (SELECT coalesce(sum(cardinality(t.positions)), 0) FROM unnest(p_vector) t);

ALTER TABLE memories
    ADD COLUMN search_vector tsvector GENERATED ALWAYS AS (memory_search_vector(content, entities)) STORED,
    ADD COLUMN search_length integer GENERATED ALWAYS AS (tsvector_token_count(memory_search_vector(content, entities))) STORED;
CREATE INDEX memories_search ON memories USING gin (user_id, search_vector);

-- The sum of the user's search_length; with memory_count, BM25's average
-- document length.
ALTER TABLE memory_users ADD COLUMN search_length_total bigint NOT NULL DEFAULT 0;
UPDATE memory_users u SET search_length_total = s.total
FROM (SELECT user_id, sum(search_length) AS total FROM memories GROUP BY user_id) s
WHERE s.user_id = u.user_id;

-- Kept in the same transaction as the memory by a row trigger (writers hold
-- the user's lock already; a direct INSERT creates the row if needed). Row
-- level, not a statement trigger with transition tables: Citus runs row
-- triggers on the shard, next to the co-located user row, and has no
-- transition tables.
CREATE FUNCTION count_search_length() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    owner text := CASE WHEN TG_OP = 'DELETE' THEN OLD.user_id ELSE NEW.user_id END;
    delta bigint := CASE TG_OP WHEN 'INSERT' THEN NEW.search_length
                               WHEN 'DELETE' THEN -OLD.search_length
                               ELSE NEW.search_length - OLD.search_length END;
BEGIN
    INSERT INTO memory_users AS u (user_id, search_length_total) VALUES (owner, delta)
    ON CONFLICT (user_id) DO UPDATE SET search_length_total = u.search_length_total + EXCLUDED.search_length_total;
    RETURN NULL;
END
$$;

CREATE TRIGGER memories_search_length_counted AFTER INSERT OR DELETE ON memories
FOR EACH ROW EXECUTE FUNCTION count_search_length();
CREATE TRIGGER memories_search_length_changed AFTER UPDATE ON memories
FOR EACH ROW WHEN (OLD.search_length IS DISTINCT FROM NEW.search_length) EXECUTE FUNCTION count_search_length();

-- BM25 (k1 = 1.2, b = 0.75, Lucene's always-positive IDF) of the user's
-- memories matching any term of p_query and the filters. Collection
-- statistics (N, average length, document frequencies) are over all the
-- user's memories, so filters change which memories rank, not their scores.
-- Terms are p_query's lexemes under the same English configuration.
CREATE FUNCTION memory_text_scores(
    p_user_id text, p_query text, p_min_gravity double precision, p_since timestamptz, p_emotion_type text)
RETURNS TABLE (memory_id uuid, text_score double precision)
LANGUAGE sql STABLE AS $$
    WITH terms AS (
        -- Each lexeme quoted for tsquery input (quotes and backslashes doubled).
        SELECT array_agg(t.lexeme) AS lexemes,
               string_agg('''' || replace(replace(t.lexeme, '\', '\\'), '''', '''''') || '''', ' | ')::tsquery AS matches
        FROM unnest(to_tsvector('english'::regconfig, p_query)) t
    ), corpus AS (
        SELECT greatest(u.memory_count, 1)::double precision AS n,
               greatest(u.search_length_total::double precision / greatest(u.memory_count, 1), 1) AS avgdl
        FROM memory_users u WHERE u.user_id = p_user_id
    ), hits AS MATERIALIZED (
        -- The query's lexemes of each matching memory, picked out in C (marked
        -- with weight A, then filtered on it): 3x faster than unnesting all.
        SELECT m.memory_id, m.search_length AS dl, t.lexeme, cardinality(t.positions) AS tf,
               m.gravity_score >= p_min_gravity AND (p_since IS NULL OR m.create_time >= p_since)
               AND (p_emotion_type IS NULL OR m.emotion_type = p_emotion_type) AS wanted
        FROM terms, memories m
        CROSS JOIN LATERAL unnest(ts_filter(setweight(m.search_vector, 'A', terms.lexemes), '{a}')) t
        WHERE m.user_id = p_user_id AND m.search_vector @@ terms.matches
    ), document_frequency AS (
        SELECT lexeme, count(*) AS df FROM hits GROUP BY lexeme
    )
    SELECT h.memory_id,
           sum(ln(1 + (c.n - f.df + 0.5) / (f.df + 0.5)) * h.tf * (1.2 + 1)
               / (h.tf + 1.2 * (1 - 0.75 + 0.75 * h.dl / c.avgdl)))
    FROM hits h JOIN document_frequency f USING (lexeme) CROSS JOIN corpus c
    WHERE h.wanted
    GROUP BY h.memory_id
$$;

------------------------------------------------------------------------------
-- Vector indexes: one partial IVFFlat index per large user, cosine over
-- halfvec, with ceil(sqrt(n)) lists for n memories at build time.

DROP INDEX memories_embedding_cosine;
DROP INDEX memories_embedding_l2;

CREATE FUNCTION memory_vector_index_name(p_user_id text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 'memories_vectors_' || md5(p_user_id);

-- Whether the user's own vector index exists and is ready to answer.
CREATE FUNCTION memory_vector_index_ready(p_user_id text) RETURNS boolean
LANGUAGE sql STABLE
RETURN coalesce((SELECT i.indisvalid AND i.indisready FROM pg_index i
                 WHERE i.indexrelid = to_regclass(memory_vector_index_name(p_user_id))), false);

-- Whether a search of the user goes through their own index: they have more
-- than p_exact_max memories (the service's search_exact_max_memories) and
-- the index is ready.
CREATE FUNCTION memory_vector_index_usable(p_user_id text, p_exact_max integer) RETURNS boolean
LANGUAGE sql STABLE
RETURN coalesce((SELECT u.memory_count > p_exact_max FROM memory_users u WHERE u.user_id = p_user_id), false)
       AND memory_vector_index_ready(p_user_id);

-- The DDL maintenance runs (outside a transaction, CONCURRENTLY), in order,
-- for users above p_min_memories: a missing index is built; a failed earlier
-- build is dropped and built again; an index the user has outgrown (four
-- times the memories its lists were sized for, so sqrt(n) lists would be
-- twice as many) gets new lists and is rebuilt in place.
CREATE FUNCTION memory_vector_indexes_due(p_min_memories integer)
RETURNS TABLE (user_id text, statements text[])
LANGUAGE sql STABLE AS $$
    SELECT u.user_id,
           CASE
               WHEN i.indexrelid IS NULL THEN ARRAY[build]
               WHEN NOT (i.indisvalid AND i.indisready)
                   THEN ARRAY[format('DROP INDEX CONCURRENTLY IF EXISTS %I', name), build]
               ELSE ARRAY[format('ALTER INDEX %I SET (lists = %s)', name, lists),
                          format('REINDEX INDEX CONCURRENTLY %I', name)]
           END
    FROM memory_users u
    CROSS JOIN LATERAL (SELECT memory_vector_index_name(u.user_id) AS name,
                               ceil(sqrt(u.memory_count))::integer AS lists) sized
    CROSS JOIN LATERAL (
        SELECT format('CREATE INDEX CONCURRENTLY %I ON memories USING ivfflat ((embedding::halfvec(%s)) '
                      'halfvec_cosine_ops) WITH (lists = %s) WHERE user_id = %L', sized.name, a.atttypmod, sized.lists,
                      u.user_id) AS build
        FROM pg_attribute a WHERE a.attrelid = 'memories'::regclass AND a.attname = 'embedding') ddl
    LEFT JOIN pg_index i ON i.indexrelid = to_regclass(sized.name)
    LEFT JOIN LATERAL (
        SELECT o.option_value::integer AS built_lists
        FROM pg_class c, pg_options_to_table(c.reloptions) o
        WHERE c.oid = i.indexrelid AND o.option_name = 'lists') current ON true
    WHERE u.memory_count > p_min_memories
      AND (i.indexrelid IS NULL OR NOT (i.indisvalid AND i.indisready)
           OR u.memory_count > 4 * current.built_lists * current.built_lists)
    ORDER BY u.memory_count DESC
$$;

-- (memory_id, distance) of the user's embedded memories matching the filters,
-- nearest first: the p_limit nearest (all of them when NULL). Exact, unless
-- the search is by cosine, a limit is given and the user's own index is
-- usable (memory_vector_index_usable): then the index is scanned, 16 lists
-- first, with pgvector's iterative scan (it probes more lists until enough
-- rows pass the filters), for 4 x p_limit (at least 40) candidates, which are
-- re-ranked by their full-precision distance; if it finds fewer than
-- p_limit, the exact scan answers instead.
CREATE FUNCTION memory_vector_distances(
    p_user_id text, p_embedding real[], p_metric text, p_limit integer, p_min_gravity double precision,
    p_since timestamptz, p_emotion_type text, p_exact_max integer)
RETURNS TABLE (memory_id uuid, distance double precision)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    operator  text := CASE p_metric WHEN 'cosine' THEN '<=>' WHEN 'l2' THEN '<->' END;
    filters   text := 'm.user_id = $1 AND m.embedding IS NOT NULL AND m.gravity_score >= $3
                       AND ($4::timestamptz IS NULL OR m.create_time >= $4) AND ($5::text IS NULL OR m.emotion_type = $5)';
    dim       integer := cardinality(p_embedding);
    ids       uuid[];
    distances double precision[];
BEGIN
    IF p_metric = 'cosine' AND p_limit IS NOT NULL AND memory_vector_index_usable(p_user_id, p_exact_max) THEN
        PERFORM set_config('ivfflat.iterative_scan', 'relaxed_order', true);
        PERFORM set_config('ivfflat.probes', '16', true);
        PERFORM set_config('enable_sort', 'off', true);  -- the index order, not a sort of the user's rows
        -- The user_id as a literal, so the planner matches the partial index's predicate.
        EXECUTE format(
            'SELECT array_agg(memory_id ORDER BY distance, memory_id), array_agg(distance ORDER BY distance, memory_id)
             FROM (SELECT c.memory_id, c.embedding <=> $2::vector AS distance FROM (
                       SELECT m.memory_id, m.embedding FROM memories m WHERE m.user_id = %L AND %s
                       ORDER BY m.embedding::halfvec(%s) <=> $2::halfvec(%s) LIMIT greatest(4 * $6, 40)) c
                   ORDER BY 2, 1 LIMIT $6) nearest', p_user_id, filters, dim, dim)
            INTO ids, distances USING p_user_id, p_embedding, p_min_gravity, p_since, p_emotion_type, p_limit;
        PERFORM set_config('enable_sort', 'on', true);
        IF coalesce(cardinality(ids), 0) >= p_limit THEN
            RETURN QUERY SELECT * FROM unnest(ids, distances);
            RETURN;
        END IF;
    END IF;
    -- Exact: distances computed in a materialized CTE, so no index order is used.
    RETURN QUERY EXECUTE format('WITH mine AS MATERIALIZED (
                                     SELECT m.memory_id, m.embedding %s $2::vector AS distance FROM memories m WHERE %s)
                                 SELECT memory_id, distance FROM mine ORDER BY distance, memory_id LIMIT $6',
                                operator, filters)
        USING p_user_id, p_embedding, p_min_gravity, p_since, p_emotion_type, p_limit;
END
$$;

------------------------------------------------------------------------------
-- SearchMemories. Filters apply before the limit in every mode.
--   embedding only: nearest first; score = 1 - distance (cosine) or -distance (l2).
--   query only:     BM25 (memory_text_scores), best first; score = text_score.
--   both (hybrid):  every candidate's similarity and BM25 are min-max
--                   normalised over the candidates and mixed,
--                   score = p_vector_weight * vector + (1 - p_vector_weight) * text, in 0..1.
--                   Candidates: all the user's matching memories (searched
--                   exactly), or when the user's own index is usable the
--                   100 (at least top_k) nearest plus the 100 best by text.
--   p_recency_weight / p_gravity_weight > 0: the best 100 re-ranked (see
--   SearchMemoriesRequest.recency_weight in protos/nexus/v1/memory.proto).
DROP FUNCTION search_memories(text, real[], text, integer, double precision, timestamptz, text, integer);

CREATE FUNCTION search_memories(
    p_user_id text, p_embedding real[], p_query text, p_metric text, p_top_k integer,
    p_min_gravity double precision, p_since timestamptz, p_emotion_type text, p_vector_weight double precision,
    p_exact_max integer, p_recency_weight double precision, p_gravity_weight double precision)
RETURNS TABLE (document jsonb, distance double precision, text_score double precision, score double precision)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    pool integer;
BEGIN
    IF p_recency_weight > 0 OR p_gravity_weight > 0 THEN
        -- Re-ranks the best 100 (at least top_k) by relevance, recency and gravity.
        RETURN QUERY
            WITH best AS (
                SELECT * FROM search_memories(p_user_id, p_embedding, p_query, p_metric, greatest(p_top_k, 100),
                                              p_min_gravity, p_since, p_emotion_type, p_vector_weight, p_exact_max, 0, 0)
            ), parts AS (
                SELECT b.document, b.distance, b.text_score,
                       coalesce((b.score - min(b.score) OVER ()) / nullif(max(b.score) OVER () - min(b.score) OVER (), 0), 0)
                           AS relevance,
                       power(0.995, extract(epoch FROM now() - (b.document ->> 'create_time')::timestamptz) / 3600)
                           AS recency,
                       (b.document ->> 'gravity_score')::double precision AS gravity
                FROM best b
            )
            SELECT p.document, p.distance, p.text_score,
                   (1 - p_recency_weight - p_gravity_weight) * p.relevance + p_recency_weight * p.recency
                   + p_gravity_weight * p.gravity
            FROM parts p
            ORDER BY 4 DESC, p.document ->> 'memory_id'
            LIMIT p_top_k;
        RETURN;
    END IF;
    IF p_query IS NULL THEN
        RETURN QUERY
            SELECT memory_document(m), v.distance, NULL::double precision,
                   CASE p_metric WHEN 'cosine' THEN 1 - v.distance ELSE -v.distance END
            FROM memory_vector_distances(p_user_id, p_embedding, p_metric, p_top_k, p_min_gravity, p_since, p_emotion_type,
                                         p_exact_max) v
            JOIN memories m USING (memory_id)
            ORDER BY v.distance, m.memory_id;
    ELSIF p_embedding IS NULL THEN
        RETURN QUERY
            SELECT memory_document(m), NULL::double precision, t.text_score, t.text_score
            FROM (SELECT * FROM memory_text_scores(p_user_id, p_query, p_min_gravity, p_since, p_emotion_type) s
                  ORDER BY s.text_score DESC, s.memory_id LIMIT p_top_k) t
            JOIN memories m USING (memory_id)
            ORDER BY t.text_score DESC, m.memory_id;
    ELSE
        IF p_metric = 'cosine' AND memory_vector_index_usable(p_user_id, p_exact_max) THEN
            pool := greatest(p_top_k, 100);
        END IF;
        RETURN QUERY
            WITH nearest AS (
                SELECT * FROM memory_vector_distances(p_user_id, p_embedding, p_metric, pool, p_min_gravity, p_since,
                                                      p_emotion_type, p_exact_max)
            ), lexical AS (
                SELECT * FROM memory_text_scores(p_user_id, p_query, p_min_gravity, p_since, p_emotion_type) s
                ORDER BY s.text_score DESC, s.memory_id LIMIT pool
            ), candidates AS (
                -- Text hits the vector side did not bring get their distance here
                -- (COALESCE reads the memory only for them).
                SELECT memory_id, l.text_score,
                       coalesce(n.distance, (SELECT CASE p_metric WHEN 'cosine' THEN m.embedding <=> p_embedding::vector
                                                                  ELSE m.embedding <-> p_embedding::vector END
                                             FROM memories m WHERE m.memory_id = l.memory_id)) AS distance
                FROM nearest n FULL JOIN lexical l USING (memory_id)
            ), scored AS (
                SELECT c.*,
                       CASE p_metric WHEN 'cosine' THEN 1 - c.distance ELSE -c.distance END AS similarity,
                       coalesce(c.text_score, 0) AS lexical_score
                FROM candidates c
            ), normalised AS (
                SELECT s.*,
                       coalesce((s.similarity - min(s.similarity) OVER ())
                                / nullif(max(s.similarity) OVER () - min(s.similarity) OVER (), 0), 0) AS vector_part,
                       coalesce((s.lexical_score - min(s.lexical_score) OVER ())
                                / nullif(max(s.lexical_score) OVER () - min(s.lexical_score) OVER (), 0), 0) AS text_part
                FROM scored s
            ), best AS (
                SELECT n.memory_id, n.distance, n.text_score,
                       p_vector_weight * n.vector_part + (1 - p_vector_weight) * n.text_part AS score
                FROM normalised n
                ORDER BY 4 DESC, n.memory_id LIMIT p_top_k
            )
            SELECT memory_document(m), b.distance, b.text_score, b.score
            FROM best b JOIN memories m USING (memory_id)
            ORDER BY b.score DESC, m.memory_id;
    END IF;
END
$$;
