-- Search reads its page's memories by primary key (issue 11).
--
-- search_memories and memory_hybrid_top join a ranking (ids in arrays) back to
-- memories. Written as a join, the planner may pick a hash join that reads
-- every memory of the user: it did for a user of 616 memories whose row count
-- the statistics did not know (estimated 11), 1.6 ms of a 5 ms search, and it
-- would read all 10k of a large user the same way. Each id is now looked up
-- by a LATERAL subquery with LIMIT 1 (a primary-key lookup; LIMIT keeps the
-- planner from flattening it back into a join). Answers are unchanged.

CREATE OR REPLACE FUNCTION memory_hybrid_top(
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
        -- LEFT: a memory deleted since the ranking keeps its place (a NULL distance).
        LEFT JOIN LATERAL (SELECT * FROM memories m WHERE m.user_id = p_user_id AND m.memory_id = u.memory_id LIMIT 1) m
            ON true;
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
            CROSS JOIN LATERAL (SELECT * FROM memories m WHERE m.user_id = p_user_id AND m.memory_id = v.memory_id LIMIT 1) m
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
            CROSS JOIN LATERAL (SELECT * FROM memories m WHERE m.user_id = p_user_id AND m.memory_id = t.memory_id LIMIT 1) m
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
        CROSS JOIN LATERAL (SELECT * FROM memories m WHERE m.user_id = p_user_id AND m.memory_id = h.memory_id LIMIT 1) m
        ORDER BY h.score DESC, m.memory_id;
END
$$;
