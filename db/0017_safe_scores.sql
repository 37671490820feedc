-- Scores that cannot fail (issue 16): PostgreSQL raises "value out of range:
-- underflow" where a product or quotient of doubles is too small to hold,
-- rather than rounding it to 0. A search re-ranked with gravity_weight 1e-200
-- over a memory of gravity 1e-200 (or any weight over a stored 5e-324) failed
-- with it, and so did every such search of that user.
--
-- Scores mix values of 0..1 (weights, gravities, recencies, scaled parts) by
-- products of two. Each such value passes through score_factor or comes from
-- score_ratio, which make it 0 or at least 1e-150 in magnitude, so a product
-- is 0 or at least 1e-300 and never underflows. Both are inlined (each
-- argument a column or a cheap expression): a SQL function that is not
-- inlined costs a call per row, which the exact hybrid path pays for every
-- memory of the user (measured: 2.9 µs a row against 0.2 µs inlined).

-- x, or 0 where x is below 1e-150 in magnitude.
CREATE FUNCTION score_factor(x double precision) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN abs(x) < 1e-150 THEN 0 ELSE x END;

-- a / b for |a| <= |b| (a part scaled to its range), NULL where b is 0, and 0
-- where the quotient is below 1e-150 in magnitude.
CREATE FUNCTION score_ratio(a double precision, b double precision) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN b = 0 THEN NULL
            WHEN abs(a) >= 1e-140 AND abs(b) <= 1e10 THEN a / b
            WHEN a = 0 THEN 0
            WHEN ln(abs(a)) - ln(abs(b)) < -345 THEN 0
            ELSE a / b END;

-- A memory's recency: 0.995 per hour of age (1 for an age below 0, a clock
-- behind), 0 past 100,000 hours, where the power nears underflow (at about
-- 140,000 hours).
CREATE FUNCTION recency(p_age interval) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN extract(epoch FROM p_age) > 100000 * 3600 THEN 0
            WHEN extract(epoch FROM p_age) < 0 THEN 1
            ELSE power(0.995, extract(epoch FROM p_age)::double precision / 3600) END;

-- As in 0010, each part scaled and mixed, through the safe forms.
CREATE OR REPLACE FUNCTION hybrid_score(
    p_similarity double precision, p_nearest double precision, p_farthest double precision,
    p_text_score double precision, p_best_text double precision, p_vector_weight double precision)
RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN score_factor(p_vector_weight) * coalesce(score_ratio(p_similarity - p_farthest, p_nearest - p_farthest), 0)
       + score_factor(1 - p_vector_weight) * coalesce(score_ratio(p_text_score, p_best_text), 0);

-- As in 0015 (STABLE as 0016 made it), the re-ranking through the safe forms.
CREATE OR REPLACE FUNCTION search_memories(
    p_user_id text, p_embedding real[], p_query text, p_metric text, p_top_k integer,
    p_min_gravity double precision, p_since timestamptz, p_emotion_type text, p_vector_weight double precision,
    p_exact_max integer, p_recency_weight double precision, p_gravity_weight double precision)
RETURNS TABLE (document jsonb, distance double precision, text_score double precision, score double precision)
LANGUAGE plpgsql STABLE AS $$
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
                       coalesce(score_ratio(b.score - min(b.score) OVER (), max(b.score) OVER () - min(b.score) OVER ()), 0)
                           AS relevance,
                       score_factor(recency(now() - (b.document ->> 'create_time')::timestamptz)) AS recency,
                       score_factor((b.document ->> 'gravity_score')::double precision) AS gravity
                FROM best b
            )
            SELECT p.document, p.distance, p.text_score,
                   score_factor(1 - p_recency_weight - p_gravity_weight) * p.relevance
                   + score_factor(p_recency_weight) * p.recency + score_factor(p_gravity_weight) * p.gravity
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
