-- Text search scored from the posting rows alone (issue 11: text and hybrid
-- latency for large users).
--
-- 0010's memory_text_top counted document frequencies from memory_terms but
-- scored each candidate from its memories row (search_vector for the term
-- frequencies, search_length): ~1.7 KB rows (they carry the embedding), one
-- random heap page per candidate, and every match of a common word when the
-- query's words are all common (bench: text p99 336 ms, hybrid 238 ms for the
-- 100k-memory user).
--
-- 1. memory_terms rows carry what BM25 needs: the lexeme's count in the memory
--    (term_frequency) and the memory's search_length, in the primary key's
--    index (INCLUDE), so a lexeme's postings are read in key order from the
--    index alone (index-only scan), without the memories heap.
-- 2. count_search_length() keeps them exact: a changed search_vector may
--    change the length (so every row of the memory) and the frequencies, so
--    the memory's rows are deleted and written anew.
-- 3. memory_text_top scores from the postings: the same BM25, scores, order
--    and MaxScore (the essential lexemes' postings read in full, the others'
--    looked up by (lexeme, memory) for those candidates, or read and joined
--    when they are many). memories is read only when a filter is given: the
--    memories holding an essential lexeme, by the GIN index as before, so the
--    filters apply before the limit.
--
-- Measured (the bench database's 100k-memory user and one 10k user copied
-- into a scratch database, 0012 and 0013 side by side, calls alternated,
-- warm; the machine was shared). The bench's queries (2-3 words of a stored
-- memory, 400 of them): 100k user text p50 10.4 -> 4.3 ms, p99 39 -> 21 ms,
-- hybrid p50 20 -> 12 ms, p99 94 -> 45 ms; 10k user text p99 26 -> 6 ms,
-- hybrid p99 76 -> 36 ms (p50 unchanged, 2 and 22 ms). One word in half of
-- the 100k user's memories ("w0"): text 245 -> 46 ms, hybrid 306 -> 66 ms; two
-- common words 107 -> 33 ms. Three words with a rarer one: 10-21 ms before and
-- after when warm (the common word's document frequency, counted from ~50k
-- postings in ~6 ms, is in both), but 600-1300 random heap pages of the 1 GB
-- memories table replaced by the postings' index pages. Filtered (min_gravity
-- 0.5): common words 146 -> 88 ms, three words with a rarer one 18 -> 24 ms
-- (the memories are read for the filter as before, and the postings too).

-- On Citus, one connection per node for the whole migration: it changes
-- distributed functions after statements on every shard, which Citus refuses
-- after a parallel operation in the same transaction.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_extension WHERE extname = 'citus') THEN
        PERFORM set_config('citus.multi_shard_modify_mode', 'sequential', true);
    END IF;
END
$$;

-- Writes of memories wait for this migration from here: a write let in
-- while memory_terms is rebuilt would fire 0010's trigger body against the
-- new table (a create fails NOT NULL; an update that only drops words or
-- changes counts leaves stale rows). Writes, text and hybrid search block
-- for the rebuild: about 8 s for 200k memories (2.6M rows) here.
LOCK TABLE memories IN SHARE ROW EXCLUSIVE MODE;

-- Rebuilt rather than updated in place: every row changes, and a rebuild
-- leaves no dead row versions. On Citus (memory_terms is distributed once a
-- cluster has run 0010) each statement runs on every shard, the INSERT ...
-- SELECT co-located by user; one change per ALTER TABLE, because Citus 14
-- refuses an ALTER TABLE of several changes on a distributed table inside a
-- migration of several statements ("cannot insert multiple commands into a
-- prepared statement"). The key's index is built after the rows are in.
TRUNCATE memory_terms;
ALTER TABLE memory_terms DROP CONSTRAINT memory_terms_pkey;
ALTER TABLE memory_terms ADD COLUMN term_frequency integer NOT NULL;  -- occurrences of the lexeme in the memory (BM25's tf)
ALTER TABLE memory_terms ADD COLUMN search_length integer NOT NULL;   -- the memory's search_length (BM25's document length)
INSERT INTO memory_terms (user_id, lexeme, memory_id, term_frequency, search_length)
SELECT m.user_id, t.lexeme, m.memory_id, cardinality(t.positions), m.search_length
FROM memories m CROSS JOIN LATERAL unnest(m.search_vector) t;
ALTER TABLE memory_terms ADD PRIMARY KEY (user_id, lexeme, memory_id) INCLUDE (term_frequency, search_length);
-- Statistics for the plans below at once (index-only scans wait for the
-- visibility map, which autovacuum fills; a migration cannot VACUUM).
ANALYZE memory_terms;

-- Length total and posting rows of the row's user, kept in the row's
-- transaction (see 0006 for why a row trigger; 0010 fires it on UPDATE when
-- the search_vector changed).
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

-- One term's part of a memory's BM25 score, as in 0010, all in double
-- precision: 0010's 0.75 * p_length was numeric arithmetic, a third of the
-- cost of scoring a common lexeme's postings. The same values (0.75 times an
-- integer is exact either way).
CREATE OR REPLACE FUNCTION bm25_term(p_idf double precision, p_tf integer, p_length integer, p_avgdl double precision)
RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN p_idf * p_tf * 2.2 / (p_tf + 1.2 * (0.25 + 0.75::double precision * p_length / p_avgdl));

-- (memory_id, BM25 text_score) of the user's memories matching p_query and
-- the filters, best first (score, then memory_id): the p_limit best (all when
-- NULL), or, given p_ids, the scores of those memories that match (filters
-- not applied). BM25 as in 0006: k1 1.2, b 0.75, Lucene's IDF, statistics over
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
    essential integer;  -- the rarest lexemes whose postings are read in full (the others only add to their scores)
    matches   tsquery;  -- any essential lexeme (filtered searches find their memories by it)
    ids       uuid[];
    scores    double precision[];
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
            SELECT t.memory_id,
                   sum(bm25_term(idfs[array_position(lexemes, t.lexeme)], t.term_frequency, t.search_length, avgdl)
                       ORDER BY t.lexeme)
            FROM memory_terms t
            WHERE t.user_id = p_user_id AND t.lexeme = ANY (lexemes) AND t.memory_id = ANY (p_ids)
            GROUP BY t.memory_id ORDER BY 2 DESC, 1;
        RETURN;
    END IF;
    -- MaxScore: the rarest term first (every term when all matches are wanted).
    essential := CASE WHEN p_limit IS NULL THEN cardinality(lexemes) ELSE 1 END;
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
        -- A memory holding none of the essential terms scores less than
        -- IDF x (k1 + 1) summed over the other terms.
        EXIT WHEN essential = cardinality(lexemes)
               OR (coalesce(cardinality(ids), 0) = p_limit
                   AND scores[p_limit] > 2.2 * (SELECT sum(i) FROM unnest(idfs[essential + 1:]) i));
        essential := essential + 1;
    END LOOP;
    RETURN QUERY SELECT * FROM unnest(ids, scores);
END
$$;
