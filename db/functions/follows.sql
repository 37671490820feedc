-- The follow graph and its counters (follow_counter_shards). A follow writes
-- two keys, the edge and the follower's count by follower, the followed's
-- count by followed: on Citus a two-shard transaction, locked in one global
-- order (count_follow_edge).

-- Does p_follower_id follow p_followed_id (entry_visible asks it of FOLLOWERS entries).
CREATE OR REPLACE FUNCTION follows_user(p_follower_id text, p_followed_id text) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN EXISTS (SELECT FROM follows f WHERE f.follower_id = p_follower_id AND f.followed_id = p_followed_id);
END $$;

-- Adds (p_delta 1) or removes (-1) the two counts of edge follower ->
-- followed. The two rows are locked one statement each, in (user_id, shard)
-- order, so a -> b racing b -> a cannot deadlock, on one node or across
-- workers. Plain updates after the lock (an upsert's proposed row would fail
-- the CHECK on a decrement).
CREATE OR REPLACE FUNCTION count_follow_edge(p_follower_id text, p_followed_id text, p_delta integer) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    row_key record;
BEGIN
    FOR row_key IN
        SELECT * FROM (VALUES (p_followed_id, counter_shard(p_follower_id)),
                              (p_follower_id, counter_shard(p_followed_id))) AS v (user_id, shard)
        ORDER BY 1, 2
    LOOP
        INSERT INTO follow_counter_shards AS s (user_id, shard) VALUES (row_key.user_id, row_key.shard)
        ON CONFLICT (user_id, shard) DO UPDATE SET follower_count = s.follower_count;
    END LOOP;
    UPDATE follow_counter_shards SET follower_count = follower_count + p_delta
    WHERE user_id = p_followed_id AND shard = counter_shard(p_follower_id);
    UPDATE follow_counter_shards SET following_count = following_count + p_delta
    WHERE user_id = p_follower_id AND shard = counter_shard(p_followed_id);
END $$;

-- Idempotent: returns whether this call changed the edge. The followed
-- account's feed lock comes first (db/functions/feed.sql): a new activity of
-- it, which holds that lock while it marks its follows, never waits on an
-- edge locked here.
CREATE OR REPLACE FUNCTION follow(p_follower_id text, p_followed_id text) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    broadcasts boolean := lock_feed_actor(p_followed_id, false);
BEGIN
    INSERT INTO follows (follower_id, followed_id, broadcast) VALUES (p_follower_id, p_followed_id, broadcasts)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM count_follow_edge(p_follower_id, p_followed_id, 1);
    IF NOT broadcasts THEN
        PERFORM feed_copy_activities(p_follower_id, p_followed_id);
    END IF;
    RETURN true;
END $$;

-- Idempotent: returns whether this call removed the edge; the account's
-- copies leave the follower's feed with it.
CREATE OR REPLACE FUNCTION unfollow(p_follower_id text, p_followed_id text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM lock_feed_actor(p_followed_id, false);
    DELETE FROM follows WHERE follower_id = p_follower_id AND followed_id = p_followed_id;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM count_follow_edge(p_follower_id, p_followed_id, -1);
    DELETE FROM home_feed WHERE reader_id = p_follower_id AND actor_id = p_followed_id;
    RETURN true;
END $$;

-- Counts in the order asked for; unknown users have zeros.
CREATE OR REPLACE FUNCTION follow_counts(p_user_ids text[])
RETURNS TABLE (user_id text, follower_count bigint, following_count bigint)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
    SELECT asked.user_id,
           coalesce(sum(s.follower_count), 0)::bigint,
           coalesce(sum(s.following_count), 0)::bigint
    FROM unnest(p_user_ids) WITH ORDINALITY AS asked (user_id, position)
    -- Filtered by key first: on Citus that reads only the asked users' shards.
    LEFT JOIN (SELECT * FROM follow_counter_shards WHERE follow_counter_shards.user_id = ANY (p_user_ids)) s
        ON s.user_id = asked.user_id
    GROUP BY asked.user_id, asked.position
    ORDER BY asked.position;
END $$;

-- For each other user: does p_user_id follow them, do they follow p_user_id.
CREATE OR REPLACE FUNCTION follow_states(p_user_id text, p_other_user_ids text[])
RETURNS TABLE (user_id text, following boolean, followed_by boolean)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    following   text[];
    followed_by text[];
BEGIN
    -- Two reads, each of one key's edges (the user's own; the others' edges to the user).
    SELECT coalesce(array_agg(f.followed_id), '{}') INTO following
    FROM follows f WHERE f.follower_id = p_user_id AND f.followed_id = ANY (p_other_user_ids);
    SELECT coalesce(array_agg(f.follower_id), '{}') INTO followed_by
    FROM follows f WHERE f.follower_id = ANY (p_other_user_ids) AND f.followed_id = p_user_id;
    RETURN QUERY
    SELECT asked.user_id, asked.user_id = ANY (following), asked.user_id = ANY (followed_by)
    FROM unnest(p_other_user_ids) WITH ORDINALITY AS asked (user_id, position)
    ORDER BY asked.position;
END $$;

-- Newest first; keyset after (p_after_time, p_after_user).
CREATE OR REPLACE FUNCTION list_followers(p_user_id text, p_after_time timestamptz, p_after_user text, p_limit integer)
RETURNS TABLE (user_id text, create_time timestamptz)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
    SELECT f.follower_id, f.create_time FROM follows f
    WHERE f.followed_id = p_user_id
      AND (p_after_time IS NULL OR (f.create_time, f.follower_id) < (p_after_time, p_after_user))
    ORDER BY f.create_time DESC, f.follower_id DESC
    LIMIT p_limit;
END $$;

-- Newest first; keyset after (p_after_time, p_after_user).
CREATE OR REPLACE FUNCTION list_following(p_user_id text, p_after_time timestamptz, p_after_user text, p_limit integer)
RETURNS TABLE (user_id text, create_time timestamptz)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
    SELECT f.followed_id, f.create_time FROM follows f
    WHERE f.follower_id = p_user_id
      AND (p_after_time IS NULL OR (f.create_time, f.followed_id) < (p_after_time, p_after_user))
    ORDER BY f.create_time DESC, f.followed_id DESC
    LIMIT p_limit;
END $$;

-- Recounts every follow counter from the edges; with p_fix, repairs drift.
CREATE OR REPLACE FUNCTION reconcile_follow_counters(p_fix boolean)
RETURNS TABLE (user_id text, shard smallint, counter text, stored bigint, actual bigint)
LANGUAGE plpgsql AS $$
BEGIN
    DROP TABLE IF EXISTS pg_temp.follow_drift;
    CREATE TEMP TABLE follow_drift ON COMMIT DROP AS
    WITH actual AS (
        SELECT f.followed_id AS user_id, counter_shard(f.follower_id) AS shard,
               count(*) AS follower_count, 0::bigint AS following_count
        FROM follows f GROUP BY 1, 2
        UNION ALL
        SELECT f.follower_id, counter_shard(f.followed_id), 0, count(*) FROM follows f GROUP BY 1, 2
    ), actual_by_shard AS (
        SELECT a.user_id, a.shard, sum(a.follower_count)::bigint AS follower_count,
               sum(a.following_count)::bigint AS following_count
        FROM actual a GROUP BY 1, 2
    )
    SELECT coalesce(a.user_id, s.user_id) AS user_id, coalesce(a.shard, s.shard) AS shard, v.counter, v.stored, v.actual
    FROM actual_by_shard a
    FULL JOIN follow_counter_shards s ON s.user_id = a.user_id AND s.shard = a.shard
    CROSS JOIN LATERAL (VALUES
        ('follower_count', coalesce(s.follower_count, 0)::bigint, coalesce(a.follower_count, 0)),
        ('following_count', coalesce(s.following_count, 0)::bigint, coalesce(a.following_count, 0))) AS v (counter, stored, actual)
    WHERE v.stored <> v.actual;

    IF p_fix THEN
        INSERT INTO follow_counter_shards (user_id, shard)
        SELECT DISTINCT d.user_id, d.shard FROM follow_drift d ON CONFLICT DO NOTHING;
        UPDATE follow_counter_shards s SET follower_count = d.actual
        FROM follow_drift d WHERE d.counter = 'follower_count' AND (s.user_id, s.shard) = (d.user_id, d.shard);
        UPDATE follow_counter_shards s SET following_count = d.actual
        FROM follow_drift d WHERE d.counter = 'following_count' AND (s.user_id, s.shard) = (d.user_id, d.shard);
    END IF;
    RETURN QUERY SELECT * FROM follow_drift;
END $$;
