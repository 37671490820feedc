-- Search speed (issue 11): text and hybrid search read only the memories
-- that can still make the page, with results unchanged.
--
-- Measured before (bench data, 10k-memory user, warm buffers): a text query
-- of three words where one is common fetched every memory containing any of
-- them (5.4k random heap pages, ~40 ms) just to count document frequencies;
-- hybrid search added every one of the user's 10k distances to a full join
-- and window functions over all of them.
--
-- 1. memory_terms: which of each user's memories hold each lexeme, kept by the
--    row trigger that already keeps the length statistics (same transaction,
--    co-located on Citus). BM25's IDF no longer needs the matching memories.
-- 2. BM25 top-k by MaxScore (memory_text_top): terms rarest first; the
--    memories matching the rarest terms are scored in full, and once the
--    k-th best of them beats what the remaining terms could add up to
--    (IDF x (k1 + 1) each, a term's strict upper bound), no other memory can
--    enter the page. Otherwise one more term is taken. Same scores and order.
-- 3. Hybrid (memory_hybrid_top), exact path by the threshold algorithm:
--    every distance is computed anyway (exact scan), text gives its best 20
--    (at least top_k) by MaxScore; a memory off the text list scores at most
--    its vector part plus the last listed text score, and that bound falls
--    with the distance, so only the nearest memories whose bound reaches the
--    top_k-th score of the text list get their text score computed (the
--    list grows 4x when that would be more than 10x its length). Same page
--    as fusing every memory.
--
-- Measured after, same data (backend CPU per query, 0006's functions beside
-- these; the machine was shared, wall times 2-5x these): that text query
-- 9 ms (was 31-42), two common words 15 ms (34-48), three words for the
-- 100k-memory user 36 ms (90); hybrid 22-25 ms (58-71), of which the exact
-- vector scan of the 10k memories is 11 ms.

-- Which of a user's memories hold each lexeme (a posting list without
-- frequencies): a lexeme's df is the count of its rows, read from the primary
-- key alone (a word in half of 100k memories: ~50k index entries, a few ms,
-- against one heap page per matching memory before). One row per (memory,
-- lexeme), not a counter per lexeme: a bulk insert of one user in one
-- transaction would update a counter once per memory, and a row updated n
-- times in one transaction costs O(n) per update (its versions cannot be
-- pruned before the commit: a 10k-memory INSERT took 74 s against 3 s); and
-- deleting a memory deletes its rows, so no word of a deleted memory stays.
CREATE TABLE memory_terms (
    user_id   text NOT NULL,
    lexeme    text NOT NULL,
    memory_id uuid NOT NULL,
    PRIMARY KEY (user_id, lexeme, memory_id)
);
INSERT INTO memory_terms (user_id, lexeme, memory_id)
SELECT m.user_id, t.lexeme, m.memory_id
FROM memories m CROSS JOIN LATERAL unnest(tsvector_to_array(m.search_vector)) t(lexeme);

-- Length total and term rows of the row's user, kept in the row's
-- transaction (see 0006 for why a row trigger).
CREATE OR REPLACE FUNCTION count_search_length() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    owner text := CASE WHEN TG_OP = 'DELETE' THEN OLD.user_id ELSE NEW.user_id END;
    delta bigint := CASE TG_OP WHEN 'INSERT' THEN NEW.search_length
                               WHEN 'DELETE' THEN -OLD.search_length
                               ELSE NEW.search_length - OLD.search_length END;
    added   text[] := CASE WHEN TG_OP <> 'DELETE' THEN tsvector_to_array(NEW.search_vector) ELSE '{}' END;
    removed text[] := CASE WHEN TG_OP <> 'INSERT' THEN tsvector_to_array(OLD.search_vector) ELSE '{}' END;
BEGIN
    IF delta <> 0 OR TG_OP <> 'UPDATE' THEN
        INSERT INTO memory_users AS u (user_id, search_length_total) VALUES (owner, delta)
        ON CONFLICT (user_id) DO UPDATE SET search_length_total = u.search_length_total + EXCLUDED.search_length_total;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        DELETE FROM memory_terms t
        WHERE t.user_id = owner AND t.lexeme = ANY (removed) AND t.lexeme <> ALL (added) AND t.memory_id = OLD.memory_id;
    END IF;
    IF TG_OP <> 'DELETE' THEN
        INSERT INTO memory_terms (user_id, lexeme, memory_id)
        SELECT owner, l, NEW.memory_id FROM unnest(added) l WHERE l <> ALL (removed);
    END IF;
    RETURN NULL;
END
$$;

-- An UPDATE that keeps the length can still change the lexemes.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_extension WHERE extname = 'citus') THEN
        PERFORM set_config('citus.enable_unsafe_triggers', 'on', true);  -- memories may be distributed already
    END IF;
END
$$;
DROP TRIGGER memories_search_length_changed ON memories;
CREATE TRIGGER memories_search_changed AFTER UPDATE ON memories
FOR EACH ROW WHEN (OLD.search_vector IS DISTINCT FROM NEW.search_vector) EXECUTE FUNCTION count_search_length();

DROP FUNCTION memory_text_scores(text, text, double precision, timestamptz, text);

-- One term's part of a memory's BM25 score: k1 1.2, b 0.75 (inlined).
CREATE FUNCTION bm25_term(p_idf double precision, p_tf integer, p_length integer, p_avgdl double precision)
RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN p_idf * p_tf * 2.2 / (p_tf + 1.2 * (0.25 + 0.75 * p_length / p_avgdl));

-- (memory_id, BM25 text_score) of the user's memories matching p_query and
-- the filters, best first (score, then memory_id): the p_limit best (all when
-- NULL), or, given p_ids, the scores of those memories that match. BM25 as in
-- 0006: k1 1.2, b 0.75, Lucene's IDF, statistics over all the user's
-- memories (filters change which memories rank, not their scores); terms
-- summed in lexeme order, so memories with the same term frequencies and
-- length tie exactly (and rank by id).
CREATE FUNCTION memory_text_top(
    p_user_id text, p_query text, p_min_gravity double precision, p_since timestamptz, p_emotion_type text,
    p_limit integer, p_ids uuid[] DEFAULT NULL)
RETURNS TABLE (memory_id uuid, text_score double precision)
LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
DECLARE
    n        double precision;
    avgdl    double precision;
    lexemes  text[];   -- the query's lexemes the user has, rarest (highest IDF) first
    idfs     double precision[];
    essential integer;  -- the rarest lexemes whose matches are read (the others only add to their scores)
    matches  tsquery;
    ids      uuid[];
    scores   double precision[];
BEGIN
    SELECT greatest(u.memory_count, 1), greatest(u.search_length_total::double precision / greatest(u.memory_count, 1), 1)
    INTO n, avgdl FROM memory_users u WHERE u.user_id = p_user_id;
    SELECT array_agg(q.lexeme ORDER BY q.idf DESC, q.lexeme), array_agg(q.idf ORDER BY q.idf DESC, q.lexeme)
    INTO lexemes, idfs
    FROM (SELECT t.lexeme, ln(1 + (n - count(*) + 0.5) / (count(*) + 0.5)) AS idf
          FROM memory_terms t
          WHERE t.user_id = p_user_id
            AND t.lexeme = ANY (tsvector_to_array(to_tsvector('english'::regconfig, p_query)))
          GROUP BY t.lexeme) q;
    IF lexemes IS NULL THEN
        RETURN;
    END IF;
    IF p_ids IS NOT NULL THEN
        RETURN QUERY
            SELECT m.memory_id, sum(bm25_term(w.idf, cardinality(t.positions), m.search_length, avgdl) ORDER BY t.lexeme)
            FROM memories m
            CROSS JOIN LATERAL unnest(ts_filter(setweight(m.search_vector, 'A', lexemes), '{a}')) t
            JOIN unnest(lexemes, idfs) w(lexeme, idf) ON w.lexeme = t.lexeme
            WHERE m.user_id = p_user_id AND m.memory_id = ANY (p_ids)
            GROUP BY m.memory_id ORDER BY 2 DESC, 1;
        RETURN;
    END IF;
    -- MaxScore: the rarest term first (every term when all matches are wanted).
    essential := CASE WHEN p_limit IS NULL THEN cardinality(lexemes) ELSE 1 END;
    LOOP
        -- Each lexeme quoted for tsquery input (quotes and backslashes doubled).
        SELECT string_agg('''' || replace(replace(l, '\', '\\'), '''', '''''') || '''', ' | ')::tsquery
        INTO matches FROM unnest(lexemes[1:essential]) l;
        SELECT array_agg(s.memory_id ORDER BY s.score DESC, s.memory_id), array_agg(s.score ORDER BY s.score DESC, s.memory_id)
        INTO ids, scores
        FROM (SELECT m.memory_id,
                     sum(bm25_term(w.idf, cardinality(t.positions), m.search_length, avgdl) ORDER BY t.lexeme) AS score
              FROM memories m
              CROSS JOIN LATERAL unnest(ts_filter(setweight(m.search_vector, 'A', lexemes), '{a}')) t
              JOIN unnest(lexemes, idfs) w(lexeme, idf) ON w.lexeme = t.lexeme
              WHERE m.user_id = p_user_id
                AND m.search_vector @@ matches
                AND m.gravity_score >= p_min_gravity AND (p_since IS NULL OR m.create_time >= p_since)
                AND (p_emotion_type IS NULL OR m.emotion_type = p_emotion_type)
              GROUP BY m.memory_id
              ORDER BY 2 DESC, 1 LIMIT p_limit) s;
        -- A memory matching none of the essential terms scores less than
        -- IDF x (k1 + 1) summed over the other terms.
        EXIT WHEN essential = cardinality(lexemes)
               OR (coalesce(cardinality(ids), 0) = p_limit
                   AND scores[p_limit] > 2.2 * (SELECT sum(i) FROM unnest(idfs[essential + 1:]) i));
        essential := essential + 1;
    END LOOP;
    RETURN QUERY SELECT * FROM unnest(ids, scores);
END
$$;

-- The filters of a vector search, as SQL over memories m with $1 the user,
-- $3 min_gravity, $4 since, $5 emotion_type.
CREATE FUNCTION memory_vector_filters() RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 'm.user_id = $1 AND m.embedding IS NOT NULL AND m.gravity_score >= $3
        AND ($4::timestamptz IS NULL OR m.create_time >= $4) AND ($5::text IS NULL OR m.emotion_type = $5)';

DROP FUNCTION memory_vector_distances(text, real[], text, integer, double precision, timestamptz, text, integer);

-- The p_limit nearest (all when NULL) of the user's embedded memories
-- matching the filters, as ids and distances nearest first, and on the exact
-- path the distance of the farthest of them (hybrid search scales by it).
-- Exact, unless the search is by cosine, a limit is given and the user's own
-- index is usable: then as in 0006 (16 lists first, iterative scan, 4 x
-- p_limit candidates re-ranked at full precision; exact when it finds too
-- few) and farthest is NULL.
CREATE FUNCTION memory_vector_nearest(
    p_user_id text, p_embedding real[], p_metric text, p_limit integer, p_min_gravity double precision,
    p_since timestamptz, p_emotion_type text, p_exact_max integer,
    OUT ids uuid[], OUT distances double precision[], OUT farthest double precision)
LANGUAGE plpgsql AS $$
DECLARE
    operator text := CASE p_metric WHEN 'cosine' THEN '<=>' WHEN 'l2' THEN '<->' END;
    dim      integer := cardinality(p_embedding);
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
                   ORDER BY 2, 1 LIMIT $6) nearest', p_user_id, memory_vector_filters(), dim, dim)
            INTO ids, distances USING p_user_id, p_embedding, p_min_gravity, p_since, p_emotion_type, p_limit;
        PERFORM set_config('enable_sort', 'on', true);
        IF coalesce(cardinality(ids), 0) >= p_limit THEN
            RETURN;
        END IF;
    END IF;
    -- Exact: distances computed in a materialized CTE, so no index order is used.
    EXECUTE format('WITH mine AS MATERIALIZED (
                        SELECT m.memory_id, m.embedding %s $2::vector AS distance FROM memories m WHERE %s)
                    SELECT array_agg(memory_id ORDER BY distance, memory_id), array_agg(distance ORDER BY distance, memory_id),
                           (SELECT max(distance) FROM mine)
                    FROM (SELECT * FROM mine ORDER BY distance, memory_id LIMIT $6) nearest',
                   operator, memory_vector_filters())
        INTO ids, distances, farthest USING p_user_id, p_embedding, p_min_gravity, p_since, p_emotion_type, p_limit;
END
$$;

-- A hybrid score: each part scaled to 0..1 (similarity between the farthest
-- and the nearest, text by the best text score; 0 when a part is missing or
-- its scale is empty) and mixed.
CREATE FUNCTION hybrid_score(
    p_similarity double precision, p_nearest double precision, p_farthest double precision,
    p_text_score double precision, p_best_text double precision, p_vector_weight double precision)
RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN p_vector_weight * coalesce((p_similarity - p_farthest) / nullif(p_nearest - p_farthest, 0), 0)
       + (1 - p_vector_weight) * coalesce(p_text_score / nullif(p_best_text, 0), 0);

CREATE FUNCTION memory_similarity(p_distance double precision, p_metric text) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE p_metric WHEN 'cosine' THEN 1 - p_distance ELSE -p_distance END;

-- (memory_id, distance, text_score, score) of the hybrid page, best first.
-- Exact path (the user searched exactly; see 3. above): scaled by the user's
-- nearest and farthest matching memory, the page equals fusing every memory.
-- The user's own index: the 100 (at least top_k) nearest plus the 100 best by
-- text, each with both parts, scaled over those candidates.
CREATE FUNCTION memory_hybrid_top(
    p_user_id text, p_embedding real[], p_query text, p_metric text, p_top_k integer,
    p_min_gravity double precision, p_since timestamptz, p_emotion_type text, p_vector_weight double precision,
    p_exact_max integer)
RETURNS TABLE (memory_id uuid, distance double precision, text_score double precision, score double precision)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    by_index       boolean := p_metric = 'cosine' AND memory_vector_index_usable(p_user_id, p_exact_max);
    pool           integer := CASE WHEN by_index THEN greatest(p_top_k, 100) END;
    text_pool      integer := greatest(p_top_k, CASE WHEN by_index THEN 100 ELSE 20 END);
    near           record;
    text_ids       uuid[] := '{}';
    text_scores    double precision[];
    text_distances double precision[];
    text_floor     double precision := 0;  -- the most a memory off the text list scores by text
    nearest        double precision;       -- the similarity scale (exact path)
    farthest       double precision;
    kth            double precision;      -- the top_k-th score among the text list
    reach          integer;               -- the near memories that can make the page (a prefix)
    reach_text_ids    uuid[];
    reach_text_scores double precision[];
BEGIN
    SELECT * INTO near FROM memory_vector_nearest(p_user_id, p_embedding, p_metric, pool,
                                                  p_min_gravity, p_since, p_emotion_type, p_exact_max);
    LOOP
        -- Each read of a distributed table in a statement of its own: on Citus a
        -- query on a shard may not call a function that reads distributed tables.
        SELECT coalesce(array_agg(t.memory_id ORDER BY t.text_score DESC, t.memory_id), '{}'),
               array_agg(t.text_score ORDER BY t.text_score DESC, t.memory_id)
        INTO text_ids, text_scores
        FROM memory_text_top(p_user_id, p_query, p_min_gravity, p_since, p_emotion_type, text_pool) t;
        SELECT array_agg(CASE p_metric WHEN 'cosine' THEN m.embedding <=> p_embedding::vector
                                       ELSE m.embedding <-> p_embedding::vector END ORDER BY u.ord)
        INTO text_distances
        FROM unnest(text_ids) WITH ORDINALITY u(memory_id, ord)
        JOIN memories m ON m.user_id = p_user_id AND m.memory_id = u.memory_id;
        text_floor := CASE WHEN cardinality(text_ids) = text_pool THEN text_scores[text_pool] ELSE 0 END;
        IF by_index THEN
            reach := coalesce(cardinality(near.ids), 0);
            EXIT;
        END IF;
        nearest := memory_similarity(near.distances[1], p_metric);
        farthest := memory_similarity(near.farthest, p_metric);
        SELECT s INTO kth FROM (
            SELECT hybrid_score(memory_similarity(x.d, p_metric), nearest, farthest, x.t, text_scores[1], p_vector_weight) AS s
            FROM unnest(text_distances, text_scores) x(d, t) ORDER BY 1 DESC OFFSET p_top_k - 1 LIMIT 1) kth;
        -- The bound falls with the distance, so the memories to examine are a prefix of the near list.
        SELECT count(*) INTO reach
        FROM unnest(near.distances) v(d)
        WHERE kth IS NULL
           OR hybrid_score(memory_similarity(v.d, p_metric), nearest, farthest, text_floor, text_scores[1], p_vector_weight)
              >= kth;
        -- Many more to examine one by one than the text list holds: a longer text list lowers the bound instead.
        EXIT WHEN text_floor = 0 OR reach <= 10 * text_pool;
        text_pool := 4 * text_pool;
    END LOOP;
    SELECT array_agg(x.memory_id), array_agg(x.text_score) INTO reach_text_ids, reach_text_scores
    FROM memory_text_top(p_user_id, p_query, p_min_gravity, p_since, p_emotion_type, NULL,
                         CASE WHEN text_floor > 0 THEN near.ids[1:reach] ELSE '{}' END) x;
    RETURN QUERY
        WITH candidates AS (
            SELECT t.id AS memory_id, t.d AS distance, t.s AS text_score
            FROM unnest(text_ids, text_distances, text_scores) t(id, d, s)
            UNION ALL
            SELECT v.id, v.d, x.text_score
            FROM unnest(near.ids[1:reach], near.distances[1:reach]) v(id, d)
            LEFT JOIN unnest(reach_text_ids, reach_text_scores) x(memory_id, text_score) ON x.memory_id = v.id
            WHERE v.id <> ALL (text_ids)
        ), scale AS (
            SELECT coalesce(nearest, max(memory_similarity(c.distance, p_metric))) AS nearest,
                   coalesce(farthest, min(memory_similarity(c.distance, p_metric))) AS farthest
            FROM candidates c
        )
        SELECT c.memory_id, c.distance, c.text_score,
               hybrid_score(memory_similarity(c.distance, p_metric), s.nearest, s.farthest, c.text_score, text_scores[1],
                            p_vector_weight)
        FROM candidates c CROSS JOIN scale s
        ORDER BY 4 DESC, 1 LIMIT p_top_k;
END
$$;

------------------------------------------------------------------------------
-- SearchMemories, as in 0006; hybrid scales text by its best candidate (BM25
-- is 0 without a match, and some candidate nearly always lacks one, which
-- made 0006's minimum 0 too).
--   hybrid: score = w * (similarity - farthest) / (nearest - farthest)
--                 + (1 - w) * text_score / best text_score,
--   nearest / farthest over the user's embedded matching memories (exact
--   path) or over the candidates (the user's own index: the 100, at least
--   top_k, nearest plus the 100 best by text, as before).
CREATE OR REPLACE FUNCTION search_memories(
    p_user_id text, p_embedding real[], p_query text, p_metric text, p_top_k integer,
    p_min_gravity double precision, p_since timestamptz, p_emotion_type text, p_vector_weight double precision,
    p_exact_max integer, p_recency_weight double precision, p_gravity_weight double precision)
RETURNS TABLE (document jsonb, distance double precision, text_score double precision, score double precision)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    near   record;
    ids    uuid[];
    dists  double precision[];
    texts  double precision[];
    scores double precision[];
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
        SELECT * INTO near FROM memory_vector_nearest(p_user_id, p_embedding, p_metric, p_top_k, p_min_gravity, p_since,
                                                      p_emotion_type, p_exact_max);
        RETURN QUERY
            SELECT memory_document(m), v.distance, NULL::double precision,
                   CASE p_metric WHEN 'cosine' THEN 1 - v.distance ELSE -v.distance END
            FROM unnest(near.ids, near.distances) v(memory_id, distance)
            JOIN memories m ON m.user_id = p_user_id AND m.memory_id = v.memory_id
            ORDER BY v.distance, m.memory_id;
        RETURN;
    ELSIF p_embedding IS NULL THEN
        -- The ranking first, in a statement of its own (as for vectors above): on
        -- Citus a query on a shard may not call a function that reads distributed tables.
        SELECT array_agg(t.memory_id), array_agg(t.text_score) INTO ids, texts
        FROM memory_text_top(p_user_id, p_query, p_min_gravity, p_since, p_emotion_type, p_top_k) t;
        RETURN QUERY
            SELECT memory_document(m), NULL::double precision, t.text_score, t.text_score
            FROM unnest(ids, texts) t(memory_id, text_score)
            JOIN memories m ON m.user_id = p_user_id AND m.memory_id = t.memory_id
            ORDER BY t.text_score DESC, m.memory_id;
        RETURN;
    END IF;
    SELECT array_agg(h.memory_id), array_agg(h.distance), array_agg(h.text_score), array_agg(h.score)
    INTO ids, dists, texts, scores
    FROM memory_hybrid_top(p_user_id, p_embedding, p_query, p_metric, p_top_k, p_min_gravity, p_since, p_emotion_type,
                           p_vector_weight, p_exact_max) h;
    RETURN QUERY
        SELECT memory_document(m), h.distance, h.text_score, h.score
        FROM unnest(ids, dists, texts, scores) h(memory_id, distance, text_score, score)
        JOIN memories m ON m.user_id = p_user_id AND m.memory_id = h.memory_id
        ORDER BY h.score DESC, m.memory_id;
END
$$;
