-- Memory retrieval: BM25 text search, vector search, hybrid search, and the
-- per-user vector indexes.
--
-- Text: each memory's search_vector and search_length (db/0001_baseline.sql),
-- per-user corpus statistics on memory_users, and the postings of
-- memory_terms, so ranking uses that user's corpus only. BM25 top-k by
-- MaxScore (memory_text_top): the essential lexemes' postings are read in
-- full, the others' looked up by (lexeme, memory) for those candidates, or
-- read and joined when they are many; once the k-th best beats what the
-- remaining terms could add up to (IDF x (k1 + 1) each, a term's strict upper
-- bound), no other memory can enter the page. The first pass reads the
-- rarest lexemes up to 25 postings per memory wanted; the k-th score it finds
-- sets how many lexemes the next pass needs, so a long question takes two or
-- three passes, not one per lexeme (measured on real sentences of 4-30 words:
-- one user of 100k memories, p90 30 -> 10 ms). memories is read only when a
-- filter is given: the memories holding an essential lexeme, by the GIN index,
-- so the filters apply before the limit.
--
-- Vectors: a user with at most search_exact_max_memories memories is searched
-- exactly (recall 1). Maintenance gives each larger user a vector index of
-- their own (partial on user_id, over halfvec to halve its size), built
-- concurrently; until it is valid that user is searched exactly too. The
-- index is IVFFlat, not HNSW: built from the user's own rows (k-means over
-- what is there, so not the empty-table IVFFlat problem) it takes seconds
-- where HNSW takes minutes, an insert costs one distance per list instead of
-- a graph search, and on clustered vectors it keeps recall where HNSW loses
-- whole clusters (measured on the bench's 100k user: recall@10 1.00 with 16 of
-- 316 lists probed, against 0.89-0.95 for HNSW at m 16-32 with a query at
-- recall 0 in every setting). Its lists are fixed at build time, with
-- ceil(sqrt(n)) lists for n memories, so maintenance rebuilds it when the
-- user has outgrown them.
--
-- The cap on those indexes: every index on memories costs every query and
-- write on memories (the planner opens and locks each one, an INSERT locks
-- each one and tests its predicate), so maintenance keeps indexes for
-- p_max_indexes users only (the service's vector_index_max_users); others
-- above the threshold are searched exactly. Which users: the largest, where a
-- user who has an index counts 1.25 times their memories, so two users
-- growing side by side at the edge of the cap do not swap places run after
-- run (each swap a concurrent drop and build). An index, once built, stays
-- until its user falls to 80% of the threshold, so a user hovering around it
-- does not have it dropped and built again run after run.
--
-- Hybrid (memory_hybrid_top), exact path by the threshold algorithm: every
-- distance is computed anyway (exact scan), text gives its best 20 (at least
-- top_k) by MaxScore; a memory off the text list scores at most its vector
-- part plus the last listed text score, and that bound falls with the
-- distance, so only the nearest memories whose bound reaches the top_k-th
-- score of the text list get their text score computed (the list grows 4x
-- when that would be more than 10x its length). Same page as fusing every
-- memory.
--
-- A search reads its memories at one instant: search_memories ranks in one
-- statement and reads the page's memories in another (and hybrid search ranks
-- text and vectors apart). The search functions are STABLE, so all their
-- statements read the calling query's snapshot: a memory deleted or updated
-- in between cannot leave a hole in the page or come back with new content
-- beside the old score. They only read; what they call is STABLE or
-- IMMUTABLE, except set_config (a built-in that runs no statement, so takes
-- no snapshot).
--
-- A ranking (ids in arrays) is joined back to memories by a LATERAL subquery
-- per id with LIMIT 1 (a primary-key lookup; LIMIT keeps the planner from
-- flattening it into a join): written as a join, the planner may pick a hash
-- join that reads every memory of the user.

-- Length total and posting rows of the row's user, kept in the row's
-- transaction (writers hold the user's lock already; a direct INSERT creates
-- the row if needed). A changed search_vector may change the length (so
-- every row of the memory) and the frequencies, so the memory's rows are
-- deleted and written anew. Row level, not a statement trigger with
-- transition tables: Citus runs row triggers on the shard, next to the
-- co-located user row, and has no transition tables.
CREATE OR REPLACE FUNCTION count_search_length() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    owner text := CASE WHEN TG_OP = 'DELETE' THEN OLD.user_id ELSE NEW.user_id END;
    delta bigint := CASE TG_OP WHEN 'INSERT' THEN NEW.search_length
                               WHEN 'DELETE' THEN -OLD.search_length
                               ELSE NEW.search_length - OLD.search_length END;
BEGIN
    IF delta <> 0 OR TG_OP <> 'UPDATE' THEN
        INSERT INTO memory_users AS u (user_id, search_length_total) VALUES (owner, delta)
        ON CONFLICT (user_id) DO UPDATE SET search_length_total = u.search_length_total + EXCLUDED.search_length_total;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        DELETE FROM memory_terms t
        WHERE t.user_id = owner AND t.lexeme = ANY (tsvector_to_array(OLD.search_vector)) AND t.memory_id = OLD.memory_id;
    END IF;
    IF TG_OP <> 'DELETE' THEN
        INSERT INTO memory_terms (user_id, lexeme, memory_id, term_frequency, search_length)
        SELECT owner, t.lexeme, NEW.memory_id, cardinality(t.positions), NEW.search_length
        FROM unnest(NEW.search_vector) t;
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER memories_search_length_counted AFTER INSERT OR DELETE ON memories
FOR EACH ROW EXECUTE FUNCTION count_search_length();
-- An UPDATE that keeps the length can still change the lexemes.
CREATE OR REPLACE TRIGGER memories_search_changed AFTER UPDATE ON memories
FOR EACH ROW WHEN (OLD.search_vector IS DISTINCT FROM NEW.search_vector) EXECUTE FUNCTION count_search_length();

-- One term's part of a memory's BM25 score: k1 1.2, b 0.75 (inlined), all in
-- double precision (numeric arithmetic would be a third of the cost of
-- scoring a common lexeme's postings).
CREATE OR REPLACE FUNCTION bm25_term(p_idf double precision, p_tf integer, p_length integer, p_avgdl double precision)
RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN p_idf * p_tf * 2.2 / (p_tf + 1.2 * (0.25 + 0.75::double precision * p_length / p_avgdl));

-- (memory_id, BM25 text_score) of the user's memories matching p_query and
-- the filters, best first (score, then memory_id): the p_limit best (all when
-- NULL), or, given p_ids, the scores of those memories that match (filters
-- not applied). BM25: k1 1.2, b 0.75, Lucene's always-positive IDF, statistics over
-- all the user's memories (filters change which memories rank, not their
-- scores); terms summed in lexeme order, so memories with the same term
-- frequencies and length tie exactly (and rank by id). Reads memory_terms
-- and memory_users; memories only when a filter is given.
CREATE OR REPLACE FUNCTION memory_text_top(
    p_user_id text, p_query text, p_min_gravity double precision, p_since timestamptz, p_emotion_type text,
    p_limit integer, p_ids uuid[] DEFAULT NULL)
RETURNS TABLE (memory_id uuid, text_score double precision)
LANGUAGE plpgsql STABLE
-- Planned for each call's lexemes: a generic plan guesses the same number of
-- postings for every lexeme, and then reads a common lexeme's postings in
-- full to look up a few candidates.
SET plan_cache_mode = force_custom_plan AS $$
#variable_conflict use_column
DECLARE
    -- gravity_score is 0..1, so a minimum of 0 (the service's default) filters nothing.
    filtered  boolean := p_min_gravity > 0 OR p_since IS NOT NULL OR p_emotion_type IS NOT NULL;
    n         double precision;
    avgdl     double precision;
    lexemes   text[];   -- the query's lexemes the user has, rarest (highest IDF) first
    idfs      double precision[];
    postings  bigint[];  -- each lexeme's number of postings (memories holding it)
    essential integer;  -- the rarest lexemes whose postings are read in full (the others only add to their scores)
    needed    integer;  -- the essential lexemes the k-th score found so far calls for
    matches   tsquery;  -- any essential lexeme (filtered searches find their memories by it)
    ids       uuid[];
    scores    double precision[];
BEGIN
    SELECT greatest(u.memory_count, 1), greatest(u.search_length_total::double precision / greatest(u.memory_count, 1), 1)
    INTO n, avgdl FROM memory_users u WHERE u.user_id = p_user_id;
    SELECT array_agg(q.lexeme ORDER BY q.idf DESC, q.lexeme), array_agg(q.idf ORDER BY q.idf DESC, q.lexeme),
           array_agg(q.postings ORDER BY q.idf DESC, q.lexeme)
    INTO lexemes, idfs, postings
    FROM (SELECT t.lexeme, ln(1 + (n - count(*) + 0.5) / (count(*) + 0.5)) AS idf, count(*) AS postings
          FROM memory_terms t
          WHERE t.user_id = p_user_id
            AND t.lexeme = ANY (tsvector_to_array(to_tsvector('english'::regconfig, p_query)))
          GROUP BY t.lexeme) q;
    IF lexemes IS NULL THEN
        RETURN;
    END IF;
    IF p_ids IS NOT NULL THEN
        RETURN QUERY
            SELECT t.memory_id,
                   sum(bm25_term(idfs[array_position(lexemes, t.lexeme)], t.term_frequency, t.search_length, avgdl)
                       ORDER BY t.lexeme)
            FROM memory_terms t
            WHERE t.user_id = p_user_id AND t.lexeme = ANY (lexemes) AND t.memory_id = ANY (p_ids)
            GROUP BY t.memory_id ORDER BY 2 DESC, 1;
        RETURN;
    END IF;
    -- MaxScore: first the rarest lexemes holding up to 25 postings per memory
    -- wanted in all (at least one lexeme; every lexeme when all matches are
    -- wanted): enough candidates, mostly, for a k-th score that leaves the
    -- common lexemes out, and no re-reading of rare postings lexeme by lexeme.
    essential := CASE WHEN p_limit IS NULL THEN cardinality(lexemes)
                      ELSE greatest(1, (SELECT count(*) FROM (
                                            SELECT sum(c) OVER (ORDER BY o) AS running
                                            FROM unnest(postings) WITH ORDINALITY x(c, o)) r
                                        WHERE r.running <= 25 * p_limit)) END;
    LOOP
        IF filtered THEN  -- each lexeme quoted for tsquery input (quotes and backslashes doubled)
            SELECT string_agg('''' || replace(replace(l, '\', '\\'), '''', '''''') || '''', ' | ')::tsquery
            INTO matches FROM unnest(lexemes[1:essential]) l;
        END IF;
        -- The essential lexemes' postings, and the other lexemes' postings of
        -- the same memories (looked up by memory, or read and joined when
        -- they are many); filtered, the memories passing the filters among
        -- those holding an essential lexeme (read once, by the GIN index).
        WITH allowed AS MATERIALIZED (
            SELECT m.memory_id FROM memories m
            WHERE m.user_id = p_user_id AND m.search_vector @@ matches
              AND m.gravity_score >= p_min_gravity AND (p_since IS NULL OR m.create_time >= p_since)
              AND (p_emotion_type IS NULL OR m.emotion_type = p_emotion_type)
        )
        SELECT array_agg(s.memory_id ORDER BY s.score DESC, s.memory_id), array_agg(s.score ORDER BY s.score DESC, s.memory_id)
        INTO ids, scores
        FROM (SELECT p.memory_id,
                     sum(bm25_term(idfs[array_position(lexemes, p.lexeme)], p.term_frequency, p.search_length, avgdl)
                         ORDER BY p.lexeme) AS score
              FROM (SELECT t.memory_id, t.lexeme, t.term_frequency, t.search_length
                    FROM memory_terms t
                    WHERE t.user_id = p_user_id AND t.lexeme = ANY (lexemes[1:essential])
                    UNION ALL
                    SELECT t.memory_id, t.lexeme, t.term_frequency, t.search_length
                    FROM memory_terms t
                    WHERE t.user_id = p_user_id AND t.lexeme = ANY (lexemes[essential + 1:])
                      AND t.memory_id IN (SELECT e.memory_id FROM memory_terms e
                                          WHERE e.user_id = p_user_id AND e.lexeme = ANY (lexemes[1:essential]))) p
              WHERE NOT filtered OR p.memory_id IN (SELECT a.memory_id FROM allowed a)
              GROUP BY p.memory_id
              ORDER BY 2 DESC, 1 LIMIT p_limit) s;
        EXIT WHEN essential = cardinality(lexemes);
        -- A memory holding none of the essential lexemes scores less than IDF x
        -- (k1 + 1) summed over the others: the k-th score found so far (the
        -- k-th best can only be better) calls for the fewest essential lexemes
        -- whose others sum below it; all of them while fewer than k matched.
        needed := CASE WHEN coalesce(cardinality(ids), 0) < p_limit THEN cardinality(lexemes)
                       ELSE (SELECT min(e) FROM generate_series(0, cardinality(lexemes)) e
                             WHERE scores[p_limit] > 2.2 * coalesce((SELECT sum(i) FROM unnest(idfs[e + 1:]) i), 0)) END;
        EXIT WHEN needed <= essential;
        essential := needed;
    END LOOP;
    RETURN QUERY SELECT * FROM unnest(ids, scores);
END
$$;

-- The name of the user's own vector index.
CREATE OR REPLACE FUNCTION memory_vector_index_name(p_user_id text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 'memories_vectors_' || md5(p_user_id);

-- Whether the user's own vector index exists and is ready to answer.
CREATE OR REPLACE FUNCTION memory_vector_index_ready(p_user_id text) RETURNS boolean
LANGUAGE sql STABLE
RETURN coalesce((SELECT i.indisvalid AND i.indisready FROM pg_index i
                 WHERE i.indexrelid = to_regclass(memory_vector_index_name(p_user_id))), false);

-- Whether a search of the user goes through their own index: they have more
-- than p_exact_max memories (the service's search_exact_max_memories) and
-- the index is ready. PL/pgSQL, not SQL, for Citus (see functions/common.sql;
-- with a RETURN body, "syntax error at or near RETURN").
CREATE OR REPLACE FUNCTION memory_vector_index_usable(p_user_id text, p_exact_max integer) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN coalesce((SELECT u.memory_count > p_exact_max FROM memory_users u WHERE u.user_id = p_user_id), false)
           AND memory_vector_index_ready(p_user_id);
END $$;

-- The filters of a vector search through the user's own index, as SQL over
-- memories m with $1 the user, $3 min_gravity, $4 since, $5 emotion_type.
CREATE OR REPLACE FUNCTION memory_vector_filters() RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 'm.user_id = $1 AND m.embedding IS NOT NULL AND m.gravity_score >= $3
        AND ($4::timestamptz IS NULL OR m.create_time >= $4) AND ($5::text IS NULL OR m.emotion_type = $5)';

-- The p_limit nearest (all when NULL) of the user's embedded memories
-- matching the filters, as ids and distances nearest first, and on the exact
-- path the distance of the farthest of them (hybrid search scales by it).
-- Exact, unless the search is by cosine, a limit is given and the user's own
-- index is usable: then the index is scanned, 16 lists first, with
-- pgvector's iterative scan (it probes more lists until enough rows pass the
-- filters), for 4 x p_limit (at least 40) candidates re-ranked by their
-- full-precision distance (exact when it finds too few), and farthest is NULL.
-- The exact path is a static statement with a generic plan (the covering
-- index memories_user_vectors, read in full for the user): planning it anew
-- per call, as EXECUTE does, weighs every partial index of memories (measured:
-- p50 9.4 -> 7.7 ms for a user of 3000 memories among 12 indexed users). On
-- Citus it is planned per call (see search_memories).
CREATE OR REPLACE FUNCTION memory_vector_nearest(
    p_user_id text, p_embedding vector, p_metric text, p_limit integer, p_min_gravity double precision,
    p_since timestamptz, p_emotion_type text, p_exact_max integer,
    OUT ids uuid[], OUT distances double precision[], OUT farthest double precision)
LANGUAGE plpgsql STABLE
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    dim integer := vector_dims(p_embedding);
BEGIN
    IF p_metric = 'cosine' AND p_limit IS NOT NULL AND memory_vector_index_usable(p_user_id, p_exact_max) THEN
        PERFORM set_config('ivfflat.iterative_scan', 'relaxed_order', true);
        PERFORM set_config('ivfflat.probes', '16', true);
        PERFORM set_config('enable_sort', 'off', true);  -- the index order, not a sort of the user's rows
        -- The user_id as a literal, so the planner matches the partial index's predicate.
        EXECUTE format(
            'SELECT array_agg(memory_id ORDER BY distance, memory_id), array_agg(distance ORDER BY distance, memory_id)
             FROM (SELECT c.memory_id, c.embedding <=> $2 AS distance FROM (
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
    WITH mine AS MATERIALIZED (
        SELECT m.memory_id,
               CASE p_metric WHEN 'cosine' THEN m.embedding <=> p_embedding ELSE m.embedding <-> p_embedding END
                   AS distance
        FROM memories m
        WHERE m.user_id = p_user_id AND m.embedding IS NOT NULL AND m.gravity_score >= p_min_gravity
          AND (p_since IS NULL OR m.create_time >= p_since) AND (p_emotion_type IS NULL OR m.emotion_type = p_emotion_type))
    SELECT array_agg(n.memory_id ORDER BY n.distance, n.memory_id), array_agg(n.distance ORDER BY n.distance, n.memory_id),
           (SELECT max(a.distance) FROM mine a)
    INTO ids, distances, farthest
    FROM (SELECT * FROM mine ORDER BY distance, memory_id LIMIT p_limit) n;
END
$$;

-- A distance as a similarity: 1 - distance (cosine) or -distance (l2).
CREATE OR REPLACE FUNCTION memory_similarity(p_distance double precision, p_metric text) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE p_metric WHEN 'cosine' THEN 1 - p_distance ELSE -p_distance END;

-- Scores that cannot fail: PostgreSQL raises "value out of range: underflow"
-- where a product or quotient of doubles is too small to hold, rather than
-- rounding it to 0 (a search re-ranked with gravity_weight 1e-200 over a
-- memory of gravity 1e-200 would fail with it).
--
-- Scores mix values of 0..1 (weights, gravities, recencies, scaled parts) by
-- products of two. Each such value passes through score_factor or comes from
-- score_ratio, which make it 0 or at least 1e-150 in magnitude, so a product
-- is 0 or at least 1e-300 and never underflows. Both are inlined (each
-- argument a column or a cheap expression): a SQL function that is not
-- inlined costs a call per row, which the exact hybrid path pays for every
-- memory of the user (measured: 2.9 µs a row against 0.2 µs inlined).

-- x, or 0 where x is below 1e-150 in magnitude.
CREATE OR REPLACE FUNCTION score_factor(x double precision) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN abs(x) < 1e-150 THEN 0 ELSE x END;

-- a / b for |a| <= |b| (a part scaled to its range), NULL where b is 0, and 0
-- where the quotient is below 1e-150 in magnitude.
CREATE OR REPLACE FUNCTION score_ratio(a double precision, b double precision) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN b = 0 THEN NULL
            WHEN abs(a) >= 1e-140 AND abs(b) <= 1e10 THEN a / b
            WHEN a = 0 THEN 0
            WHEN ln(abs(a)) - ln(abs(b)) < -345 THEN 0
            ELSE a / b END;

-- A memory's recency: 0.995 per hour of age (1 for an age below 0, a clock
-- behind), 0 past 100,000 hours, where the power nears underflow (at about
-- 140,000 hours).
CREATE OR REPLACE FUNCTION recency(p_age interval) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN extract(epoch FROM p_age) > 100000 * 3600 THEN 0
            WHEN extract(epoch FROM p_age) < 0 THEN 1
            ELSE power(0.995, extract(epoch FROM p_age)::double precision / 3600) END;

-- A hybrid score: each part scaled to 0..1 (similarity between the farthest
-- and the nearest, text by the best text score; 0 when a part is missing or
-- its scale is empty) and mixed, through the safe forms.
CREATE OR REPLACE FUNCTION hybrid_score(
    p_similarity double precision, p_nearest double precision, p_farthest double precision,
    p_text_score double precision, p_best_text double precision, p_vector_weight double precision)
RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN score_factor(p_vector_weight) * coalesce(score_ratio(p_similarity - p_farthest, p_nearest - p_farthest), 0)
       + score_factor(1 - p_vector_weight) * coalesce(score_ratio(p_text_score, p_best_text), 0);

-- (memory_id, distance, text_score, score) of the hybrid page, best first.
-- Exact path (the user searched exactly): scaled by the user's nearest and
-- farthest matching memory, the page equals fusing every memory. The user's
-- own index: the 100 (at least top_k) nearest plus the 100 best by text, each
-- with both parts, scaled over those candidates.
CREATE OR REPLACE FUNCTION memory_hybrid_top(
    p_user_id text, p_embedding vector, p_query text, p_metric text, p_top_k integer,
    p_min_gravity double precision, p_since timestamptz, p_emotion_type text, p_vector_weight double precision,
    p_exact_max integer)
RETURNS TABLE (memory_id uuid, distance double precision, text_score double precision, score double precision)
LANGUAGE plpgsql STABLE
SET plan_cache_mode = force_generic_plan  -- see search_memories
AS $$
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
        SELECT array_agg(CASE p_metric WHEN 'cosine' THEN m.embedding <=> p_embedding
                                       ELSE m.embedding <-> p_embedding END ORDER BY u.ord)
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

-- SearchMemories. Filters apply before the limit in every mode.
--   embedding only: nearest first; score = 1 - distance (cosine) or -distance (l2).
--   query only:     BM25 (memory_text_top), best first; score = text_score.
--   both (hybrid):  score = w * (similarity - farthest) / (nearest - farthest)
--                         + (1 - w) * text_score / best text_score,
--                   nearest / farthest over the user's embedded matching
--                   memories (exact path) or over the candidates (the user's
--                   own index: the 100, at least top_k, nearest plus the 100
--                   best by text); text is scaled by its best candidate
--                   (BM25 is 0 without a match).
--   p_recency_weight / p_gravity_weight > 0: the best 100 re-ranked (see
--   SearchMemoriesRequest.recency_weight in protos/nexus/v1/memory.proto),
--   through the safe forms.
CREATE OR REPLACE FUNCTION search_memories(
    p_user_id text, p_embedding vector, p_query text, p_metric text, p_top_k integer,
    p_min_gravity double precision, p_since timestamptz, p_emotion_type text, p_vector_weight double precision,
    p_exact_max integer, p_recency_weight double precision, p_gravity_weight double precision)
RETURNS TABLE (document jsonb, distance double precision, text_score double precision, score double precision)
LANGUAGE plpgsql STABLE
-- Generic plans: a memory is read back by its primary key (user_id,
-- memory_id), but a custom plan for a user the statistics have not seen yet
-- (a new user, or one who wrote since the last ANALYZE) estimates the user at
-- one row, and then any index on user_id looks as good as the key: measured,
-- a page of 10 read through (user_id, temporal_type), 2.5k rows scanned per
-- memory, 35 ms instead of 0.1. A generic plan counts rows per user on
-- average. The functions called plan for themselves (memory_text_top sets
-- custom plans). On Citus, which plans a statement on a distributed table
-- only with its parameters' values, migration resets this to per-call plans
-- (nexus.distribution).
SET plan_cache_mode = force_generic_plan
AS $$
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

-- The vector-index DDL due, drops first: (action, index, user, statements)
-- with action 'drop' (an index of a user no longer chosen, or the remains of
-- a failed REINDEX CONCURRENTLY: name_ccnew / name_ccold; user NULL),
-- 'build', 'repair' (an invalid index dropped and built again) or 'rebuild'
-- (new lists for a user who outgrew them: four times the memories its lists
-- were sized for, so sqrt(n) lists would be twice as many; or again after a failed
-- REINDEX CONCURRENTLY, whose name_ccnew is dropped first: the lists were
-- already set, so the index reports sizes it was not built with). Users are
-- read in a statement of their own because memory_users is distributed and
-- the catalogs are local to the node running maintenance.
CREATE OR REPLACE FUNCTION memory_vector_indexes_due(p_min_memories integer, p_max_indexes integer)
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
    -- Apart from the statement above: memory_users is distributed, the catalogs are local.
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
