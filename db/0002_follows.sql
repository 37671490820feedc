-- The follow graph and its counters; FOLLOWERS entries become visible to the
-- author's followers.

CREATE TABLE follows (
    follower_id text NOT NULL,
    followed_id text NOT NULL,
    create_time timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (follower_id, followed_id),
    CHECK (follower_id <> followed_id)
);
CREATE INDEX follows_followers ON follows (followed_id, create_time, follower_id);
CREATE INDEX follows_following ON follows (follower_id, create_time, followed_id);

-- follower_count of (user_id, shard) counts edges x -> user_id with
-- counter_shard(x) = shard; following_count counts edges user_id -> y with
-- counter_shard(y) = shard. Each shard is exact on its own and never negative,
-- and a celebrity's new followers spread over 64 rows.
CREATE TABLE follow_counter_shards (
    user_id         text NOT NULL,
    shard           smallint NOT NULL CHECK (shard BETWEEN 0 AND 63),
    follower_count  integer NOT NULL DEFAULT 0 CHECK (follower_count >= 0),
    following_count integer NOT NULL DEFAULT 0 CHECK (following_count >= 0),
    PRIMARY KEY (user_id, shard)
) WITH (fillfactor = 50);

-- An edge changes two counter rows. They are locked in (user_id, shard)
-- order in one statement, so a -> b racing b -> a cannot deadlock.
CREATE FUNCTION count_follow() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    edge  follows := CASE WHEN TG_OP = 'INSERT' THEN NEW ELSE OLD END;
    delta integer := CASE WHEN TG_OP = 'INSERT' THEN 1 ELSE -1 END;
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO follow_counter_shards AS s (user_id, shard, follower_count, following_count)
        SELECT * FROM (VALUES (edge.followed_id, counter_shard(edge.follower_id), 1, 0),
                              (edge.follower_id, counter_shard(edge.followed_id), 0, 1)) AS v
        ORDER BY 1, 2
        ON CONFLICT (user_id, shard) DO UPDATE
            SET follower_count = s.follower_count + excluded.follower_count,
                following_count = s.following_count + excluded.following_count;
    ELSE
        -- Plain updates (an upsert's proposed row would fail the CHECK), after
        -- locking both rows in order.
        PERFORM FROM follow_counter_shards
        WHERE (user_id, shard) IN ((edge.followed_id, counter_shard(edge.follower_id)),
                                   (edge.follower_id, counter_shard(edge.followed_id)))
        ORDER BY user_id, shard
        FOR NO KEY UPDATE;
        UPDATE follow_counter_shards SET follower_count = follower_count + delta
        WHERE user_id = edge.followed_id AND shard = counter_shard(edge.follower_id);
        UPDATE follow_counter_shards SET following_count = following_count + delta
        WHERE user_id = edge.follower_id AND shard = counter_shard(edge.followed_id);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER follows_counted AFTER INSERT OR DELETE ON follows
FOR EACH ROW EXECUTE FUNCTION count_follow();

-- Idempotent: returns whether this call changed the edge.
CREATE FUNCTION follow(p_follower_id text, p_followed_id text) RETURNS boolean
LANGUAGE sql AS $$
    WITH added AS (
        INSERT INTO follows (follower_id, followed_id) VALUES (p_follower_id, p_followed_id)
        ON CONFLICT DO NOTHING RETURNING 1)
    SELECT count(*) = 1 FROM added
$$;

CREATE FUNCTION unfollow(p_follower_id text, p_followed_id text) RETURNS boolean
LANGUAGE sql AS $$
    WITH removed AS (
        DELETE FROM follows WHERE follower_id = p_follower_id AND followed_id = p_followed_id RETURNING 1)
    SELECT count(*) = 1 FROM removed
$$;

-- Counts in the order asked for; unknown users have zeros.
CREATE FUNCTION follow_counts(p_user_ids text[])
RETURNS TABLE (user_id text, follower_count bigint, following_count bigint)
LANGUAGE sql STABLE AS $$
    SELECT asked.user_id,
           coalesce(sum(s.follower_count), 0)::bigint,
           coalesce(sum(s.following_count), 0)::bigint
    FROM unnest(p_user_ids) WITH ORDINALITY AS asked (user_id, position)
    LEFT JOIN follow_counter_shards s ON s.user_id = asked.user_id
    GROUP BY asked.user_id, asked.position
    ORDER BY asked.position
$$;

-- For each other user: does p_user_id follow them, do they follow p_user_id.
CREATE FUNCTION follow_states(p_user_id text, p_other_user_ids text[])
RETURNS TABLE (user_id text, following boolean, followed_by boolean)
LANGUAGE sql STABLE AS $$
    SELECT asked.user_id,
           EXISTS (SELECT FROM follows f WHERE f.follower_id = p_user_id AND f.followed_id = asked.user_id),
           EXISTS (SELECT FROM follows f WHERE f.follower_id = asked.user_id AND f.followed_id = p_user_id)
    FROM unnest(p_other_user_ids) WITH ORDINALITY AS asked (user_id, position)
    ORDER BY asked.position
$$;

-- Newest first; keyset after (p_after_time, p_after_user).
CREATE FUNCTION list_followers(p_user_id text, p_after_time timestamptz, p_after_user text, p_limit integer)
RETURNS TABLE (user_id text, create_time timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT f.follower_id, f.create_time FROM follows f
    WHERE f.followed_id = p_user_id
      AND (p_after_time IS NULL OR (f.create_time, f.follower_id) < (p_after_time, p_after_user))
    ORDER BY f.create_time DESC, f.follower_id DESC
    LIMIT p_limit
$$;

CREATE FUNCTION list_following(p_user_id text, p_after_time timestamptz, p_after_user text, p_limit integer)
RETURNS TABLE (user_id text, create_time timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT f.followed_id, f.create_time FROM follows f
    WHERE f.follower_id = p_user_id
      AND (p_after_time IS NULL OR (f.create_time, f.followed_id) < (p_after_time, p_after_user))
    ORDER BY f.create_time DESC, f.followed_id DESC
    LIMIT p_limit
$$;

CREATE FUNCTION follows_user(p_follower_id text, p_followed_id text) RETURNS boolean
LANGUAGE sql STABLE
RETURN EXISTS (SELECT FROM follows f WHERE f.follower_id = p_follower_id AND f.followed_id = p_followed_id);

-- FOLLOWERS entries are now visible to the author's followers. The subquery
-- stays inside follows_user, so this expression still inlines into the
-- queries that use it, and only FOLLOWERS entries pay for the lookup.
CREATE OR REPLACE FUNCTION entry_visible(e entries, p_viewer text) RETURNS boolean
LANGUAGE sql STABLE
RETURN p_viewer IS NULL OR e.privacy = 'public' OR e.author_id = p_viewer
       OR (e.privacy = 'followers' AND follows_user(p_viewer, e.author_id));

-- Recounts every follow counter from the edges; with p_fix, repairs drift.
CREATE FUNCTION reconcile_follow_counters(p_fix boolean)
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
