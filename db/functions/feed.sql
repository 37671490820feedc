-- The home feed (docs/feed.md): fan-out on write for most accounts, on read
-- for broadcasters.
--
-- An account's activities (feed_activities) are the root entries it wrote
-- and the entries it amplified. While the account has fewer than
-- feed_broadcast_followers() followers, each new activity is copied into
-- every follower's home_feed in the writing transaction, and a new follower
-- gets the account's activities copied in its follow. An account that has
-- that many followers when it writes becomes a broadcaster for good: its
-- follows are marked (follows.broadcast), and its activities (those so far,
-- and its later ones, which are not copied) are also kept in
-- broadcast_activities, where each follower's page reads them: on Citus a
-- reference table, so a page reads only its viewer's worker.
--
-- Exactness rests on one lock per account, its feed_actors row: a new or
-- removed activity takes it exclusively (FOR NO KEY UPDATE), a follow or an
-- unfollow of the account takes it shared. So an activity and a follow of its
-- account never pass each other unseen: whichever locks second sees the
-- other's rows, and the item is copied exactly once (by the fan-out or by the
-- follow's copy). A follow or an unfollow takes the lock first, before the
-- edge and its counters; a writer of activities takes it after its other
-- locks (entries, reactions), several in user_id order, and then locks only
-- the account's follows (when it becomes a broadcaster) and its rows of
-- broadcast_activities.

-- Locks p_actor's feed_actors row, creating it: exclusively for a change of
-- its activities, shared for a follow or unfollow of it. Returns whether the
-- account broadcasts.
CREATE OR REPLACE FUNCTION lock_feed_actor(p_actor text, p_exclusive boolean) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    broadcasts boolean;
BEGIN
    INSERT INTO feed_actors (user_id) VALUES (p_actor) ON CONFLICT DO NOTHING;
    IF p_exclusive THEN
        SELECT a.broadcast INTO broadcasts FROM feed_actors a WHERE a.user_id = p_actor FOR NO KEY UPDATE;
    ELSE
        SELECT a.broadcast INTO broadcasts FROM feed_actors a WHERE a.user_id = p_actor FOR SHARE;
    END IF;
    RETURN broadcasts;
END $$;

-- The account's followers, from its counter shards (its own key: on Citus,
-- its worker only; the follows themselves are placed by follower).
CREATE OR REPLACE FUNCTION follower_count(p_user_id text) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT coalesce(sum(s.follower_count), 0) FROM follow_counter_shards s WHERE s.user_id = p_user_id);
END $$;

-- The writes of broadcast_activities: p_rows added, or one activity removed.
-- The caller holds the account's feed lock (exclusively), which orders every
-- write of the account's rows. On Citus, where the table is a reference
-- table, Citus would also order writes of different accounts against each
-- other (a removal locks out every other write until it commits), and so wait
-- across the account locks a batch takes in turn: these are marked
-- commutative there (nexus.distribution.CITUS_FUNCTION_SETTINGS).
CREATE OR REPLACE FUNCTION broadcast_add(p_rows feed_row[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO broadcast_activities (actor_id, entry_id, reason, item_time)
    SELECT r.actor_id, r.entry_id, r.reason, r.item_time FROM unnest(p_rows) r;
END $$;

CREATE OR REPLACE FUNCTION broadcast_remove(p_actor text, p_entry_id uuid, p_reason feed_reason) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM broadcast_activities b WHERE b.actor_id = p_actor AND b.entry_id = p_entry_id AND b.reason = p_reason;
END $$;

-- Adds an activity of p_actor and copies it into its followers' feeds, unless
-- the account broadcasts. An account with feed_broadcast_followers()
-- followers becomes a broadcaster here. Adding an activity twice does nothing;
-- adding it at another time (an amplification undone and done again in one
-- batch) moves it, and its copies, to that time.
CREATE OR REPLACE FUNCTION feed_publish(p_actor text, p_entry_id uuid, p_reason feed_reason, p_time timestamptz)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    broadcasts boolean := lock_feed_actor(p_actor, true);
    -- Read under the lock: a follow of the account waits for it, so the count is exact.
    followers bigint := follower_count(p_actor);
    existing  feed_row[];  -- the account's activities when it becomes a broadcaster
BEGIN
    IF EXISTS (SELECT FROM feed_activities a
               WHERE a.actor_id = p_actor AND a.entry_id = p_entry_id AND a.reason = p_reason
                 AND a.item_time <> p_time) THEN
        PERFORM feed_remove_activity(p_actor, p_entry_id, p_reason, 'infinity', broadcasts);
    END IF;
    IF NOT broadcasts AND followers >= feed_broadcast_followers() THEN
        UPDATE feed_actors SET broadcast = true WHERE user_id = p_actor;
        UPDATE follows SET broadcast = true WHERE followed_id = p_actor;
        -- Read first: as an argument, Citus would run broadcast_add inside the read, on the shard's worker.
        SELECT coalesce(array_agg(ROW(a.entry_id, a.actor_id, a.reason, a.item_time)::feed_row), '{}') INTO existing
        FROM feed_activities a WHERE a.actor_id = p_actor;
        PERFORM broadcast_add(existing);
        broadcasts := true;
    END IF;
    INSERT INTO feed_activities (actor_id, entry_id, reason, item_time, fanned_out)
    VALUES (p_actor, p_entry_id, p_reason, p_time, NOT broadcasts)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF broadcasts THEN
        PERFORM broadcast_add(ARRAY[ROW(p_entry_id, p_actor, p_reason, p_time)::feed_row]);
    ELSIF followers > 0 THEN
        -- A new activity has no copies yet (a follow copies only those it sees, under the lock).
        INSERT INTO home_feed (reader_id, entry_id, actor_id, reason, item_time)
        SELECT f.follower_id, p_entry_id, p_actor, p_reason, p_time FROM follows f WHERE f.followed_id = p_actor;
    END IF;
END $$;

-- Removes an activity of p_actor older than p_before, and its copies: in its
-- followers' feeds if it was fanned out, in broadcast_activities if
-- p_broadcasts (the account broadcasts). The caller holds the account's feed
-- lock.
CREATE OR REPLACE FUNCTION feed_remove_activity(p_actor text, p_entry_id uuid, p_reason feed_reason,
                                                p_before timestamptz, p_broadcasts boolean) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    fanned boolean;
BEGIN
    DELETE FROM feed_activities a
    WHERE a.actor_id = p_actor AND a.entry_id = p_entry_id AND a.reason = p_reason AND a.item_time < p_before
    RETURNING a.fanned_out INTO fanned;
    IF FOUND AND p_broadcasts THEN
        PERFORM broadcast_remove(p_actor, p_entry_id, p_reason);
    END IF;
    -- Copies exist only in current followers' feeds (an unfollow removes them).
    IF fanned AND follower_count(p_actor) > 0 THEN
        DELETE FROM home_feed h USING follows f
        WHERE f.followed_id = p_actor AND h.reader_id = f.follower_id
          AND h.entry_id = p_entry_id AND h.actor_id = p_actor AND h.reason = p_reason;
    END IF;
END $$;

-- Removes an activity of p_actor, and its copies if it was fanned out.
CREATE OR REPLACE FUNCTION feed_retract(p_actor text, p_entry_id uuid, p_reason feed_reason) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM feed_remove_activity(p_actor, p_entry_id, p_reason, 'infinity', lock_feed_actor(p_actor, true));
END $$;

-- Copies p_followed_id's activities into p_follower_id's feed (a new
-- follow of an account that does not broadcast; the caller holds the
-- account's feed lock).
CREATE OR REPLACE FUNCTION feed_copy_activities(p_follower_id text, p_followed_id text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO home_feed (reader_id, entry_id, actor_id, reason, item_time)
    SELECT p_follower_id, a.entry_id, a.actor_id, a.reason, a.item_time
    FROM feed_activities a WHERE a.actor_id = p_followed_id
    ON CONFLICT DO NOTHING;
END $$;

-- The newest p_limit rows of p_reader's home_feed below (p_before_time,
-- p_before_entry) (NULL: from the top), from p_since on.
CREATE OR REPLACE FUNCTION home_feed_window(p_reader text, p_before_time timestamptz, p_before_entry uuid,
                                           p_since timestamptz, p_limit integer)
RETURNS feed_row[]
LANGUAGE plpgsql STABLE AS $$
DECLARE
    rows feed_row[];
BEGIN
    SELECT coalesce(array_agg(ROW(h.entry_id, h.actor_id, h.reason, h.item_time)::feed_row
                              ORDER BY h.item_time DESC, h.entry_id DESC), '{}') INTO rows
    FROM (SELECT * FROM home_feed h
          WHERE h.reader_id = p_reader AND h.item_time >= p_since
            AND (p_before_time IS NULL OR (h.item_time, h.entry_id) < (p_before_time, p_before_entry))
            -- Only copies of accounts the reader follows: on Citus an unfollow may run
            -- while a post's copy into the reader's feed is still committing on the
            -- reader's worker (a two-phase commit ends on each worker on its own), and
            -- leave it behind.
            -- (A subquery per row, one index probe: as EXISTS the planner may join the reader's follows whole.)
            AND (SELECT true FROM follows f WHERE f.follower_id = p_reader AND f.followed_id = h.actor_id)
          ORDER BY h.item_time DESC, h.entry_id DESC LIMIT p_limit) h;
    RETURN rows;
END $$;

-- The newest p_limit root entries of p_author's below (p_before_time,
-- p_before_entry) (NULL: from the top), from p_since on.
CREATE OR REPLACE FUNCTION own_entries_window(p_author text, p_before_time timestamptz, p_before_entry uuid,
                                              p_since timestamptz, p_limit integer)
RETURNS feed_row[]
LANGUAGE plpgsql STABLE AS $$
DECLARE
    rows feed_row[];
BEGIN
    SELECT coalesce(array_agg(ROW(a.entry_id, a.actor_id, a.reason, a.item_time)::feed_row
                              ORDER BY a.item_time DESC, a.entry_id DESC), '{}') INTO rows
    FROM (SELECT * FROM feed_activities a
          WHERE a.actor_id = p_author AND a.reason = 'authored' AND a.item_time >= p_since
            AND (p_before_time IS NULL OR (a.item_time, a.entry_id) < (p_before_time, p_before_entry))
          ORDER BY a.item_time DESC, a.entry_id DESC LIMIT p_limit) a;
    RETURN rows;
END $$;

-- The newest p_limit activities of the broadcasters p_actors below
-- (p_before_time, p_before_entry) (NULL: from the top), from p_since on: the
-- newest p_limit of each, merged.
CREATE OR REPLACE FUNCTION broadcasts_window(p_actors text[], p_before_time timestamptz, p_before_entry uuid,
                                             p_since timestamptz, p_limit integer)
RETURNS feed_row[]
LANGUAGE plpgsql STABLE AS $$
DECLARE
    rows feed_row[];
BEGIN
    SELECT coalesce(array_agg(ROW(a.entry_id, a.actor_id, a.reason, a.item_time)::feed_row
                              ORDER BY a.item_time DESC, a.entry_id DESC), '{}') INTO rows
    FROM (SELECT b.* FROM unnest(p_actors) AS actor (actor_id)
          CROSS JOIN LATERAL (SELECT * FROM broadcast_activities b
                              WHERE b.actor_id = actor.actor_id AND b.item_time >= p_since
                                AND (p_before_time IS NULL
                                     OR (b.item_time, b.entry_id) < (p_before_time, p_before_entry))
                              ORDER BY b.item_time DESC, b.entry_id DESC LIMIT p_limit) b
          ORDER BY b.item_time DESC, b.entry_id DESC LIMIT p_limit) a;
    RETURN rows;
END $$;

-- A page of p_viewer's home feed: at most p_limit entries after the item at
-- (p_after_time, p_after_entry) (NULL: from the top), newest first, each
-- hydrated as get_entries hydrates it for p_viewer. The feed reaches back
-- p_retention: an activity older than that does not count.
--
-- An item is an entry; its feed_time is its newest activity among the
-- viewer's: an authored root entry by its creation, an amplification by the
-- amplification. The rows come from three sources, each read newest first in
-- windows: the viewer's home_feed, the viewer's own root entries, and the
-- activities of the broadcasters the viewer follows (broadcast_activities).
-- On Citus all three are on the viewer's worker, where the call runs; only
-- the hydration (get_entries) reads the workers of the entries shown. A
-- window of every source is merged down to the frontier that every source has
-- read past, its rows grouped by entry. An entry already listed (in this call, or above the
-- page token: it has an activity at or above the token) is not listed again.
-- Entries the viewer may not see, and deleted ones, drop out at hydration,
-- and the next windows fill the page.
CREATE OR REPLACE FUNCTION list_home_feed(p_viewer text, p_after_time timestamptz, p_after_entry uuid,
                                          p_limit integer, p_retention interval)
RETURNS TABLE (entry_id uuid, author_id text, parent_entry_id uuid, root_entry_id uuid, depth integer,
               branch_order integer, type text, title text, content text, privacy privacy, tags text[],
               metadata jsonb, create_time timestamptz, update_time timestamptz, branch_count bigint,
               resonance_count bigint, amplification_count bigint, share_count bigint,
               has_resonated boolean, has_amplified boolean,
               feed_time timestamptz, authored boolean, amplified_by text[])
LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
DECLARE
    broadcasters text[];
    window_size  integer := p_limit + 1;
    since        timestamptz := now() - p_retention;
    scan_time    timestamptz := p_after_time;  -- the windows read below (scan_time, scan_entry)
    scan_entry   uuid := p_after_entry;
    front_time   timestamptz;                  -- what every source has read past
    front_entry  uuid;
    source       integer;                      -- 0: home_feed, 1: own entries, 2: broadcasters
    got          feed_row[];
    merged       feed_row[];
    listed       uuid[] := '{}';
    candidates   uuid[];
    times        timestamptz[];
    related      feed_row[];                   -- every activity of the candidates that counts for the viewer
    shown        integer := 0;
    added        integer;
BEGIN
    SELECT coalesce(array_agg(f.followed_id ORDER BY f.followed_id), '{}') INTO broadcasters
    FROM follows f WHERE f.follower_id = p_viewer AND f.broadcast;
    LOOP
        merged := '{}';
        front_time := NULL;
        front_entry := NULL;
        FOR source IN 0 .. 2 LOOP
            got := CASE source WHEN 0 THEN home_feed_window(p_viewer, scan_time, scan_entry, since, window_size)
                               WHEN 1 THEN own_entries_window(p_viewer, scan_time, scan_entry, since, window_size)
                               ELSE broadcasts_window(broadcasters, scan_time, scan_entry, since, window_size) END;
            IF cardinality(got) = window_size
               AND (front_time IS NULL OR ((got[window_size]).item_time, (got[window_size]).entry_id)
                                          > (front_time, front_entry)) THEN
                front_time := (got[window_size]).item_time;
                front_entry := (got[window_size]).entry_id;
            END IF;
            merged := merged || got;
        END LOOP;

        -- The window's entries not listed yet, newest first, down to the frontier.
        SELECT coalesce(array_agg(w.entry_id ORDER BY w.newest DESC, w.entry_id DESC), '{}'),
               coalesce(array_agg(w.newest ORDER BY w.newest DESC, w.entry_id DESC), '{}')
        INTO candidates, times
        FROM (SELECT m.entry_id, max(m.item_time) AS newest FROM unnest(merged) m
              WHERE (front_time IS NULL OR (m.item_time, m.entry_id) >= (front_time, front_entry))
                AND m.entry_id <> ALL (listed)
              GROUP BY m.entry_id) w;
        -- Only as many as the page still takes are hydrated; the rest are read again below the last taken.
        IF cardinality(candidates) > p_limit - shown THEN
            candidates := candidates[1:p_limit - shown];
            front_time := times[p_limit - shown];
            front_entry := candidates[p_limit - shown];
        END IF;
        listed := listed || candidates;

        IF cardinality(candidates) > 0 THEN
            SELECT coalesce(array_agg(ROW(h.entry_id, h.actor_id, h.reason, h.item_time)::feed_row), '{}')
            INTO related FROM home_feed h
            WHERE h.reader_id = p_viewer AND h.entry_id = ANY (candidates) AND h.item_time >= since
              AND (SELECT true FROM follows f WHERE f.follower_id = p_viewer AND f.followed_id = h.actor_id);
            IF cardinality(broadcasters) > 0 THEN
                SELECT related || coalesce(array_agg(ROW(a.entry_id, a.actor_id, a.reason, a.item_time)::feed_row), '{}')
                INTO related FROM broadcast_activities a
                WHERE a.actor_id = ANY (broadcasters) AND a.entry_id = ANY (candidates) AND a.item_time >= since;
            END IF;
            RETURN QUERY
            SELECT g.*, times[c.position],
                   g.depth = 0 AND (g.author_id = p_viewer
                                    OR EXISTS (SELECT FROM unnest(related) r
                                               WHERE r.entry_id = g.entry_id AND r.reason = 'authored')),
                   -- A broadcaster's amplification from before its promotion is there twice:
                   -- its copy and its own activity.
                   (SELECT coalesce(array_agg(a.actor_id ORDER BY a.item_time DESC, a.actor_id), '{}')
                    FROM (SELECT DISTINCT r.actor_id, r.item_time FROM unnest(related) r
                          WHERE r.entry_id = g.entry_id AND r.reason = 'amplified') a)
            FROM get_entries(candidates, p_viewer, p_viewer) g
            JOIN unnest(candidates) WITH ORDINALITY AS c (entry_id, position) ON c.entry_id = g.entry_id
            -- Above the token: listed on an earlier page, or moved up since.
            WHERE p_after_time IS NULL
               OR NOT EXISTS (SELECT FROM unnest(related) r
                              WHERE r.entry_id = g.entry_id
                                AND (r.item_time, r.entry_id) >= (p_after_time, p_after_entry))
            ORDER BY c.position
            LIMIT p_limit - shown;
            GET DIAGNOSTICS added = ROW_COUNT;
            shown := shown + added;
        END IF;
        EXIT WHEN shown >= p_limit OR front_time IS NULL;
        scan_time := front_time;
        scan_entry := front_entry;
    END LOOP;
END $$;

-- Removes up to p_batch activities older than p_retention (the feed's reach:
-- list_home_feed no longer shows them), oldest first, with their copies in
-- followers' feeds; returns how many it picked. The batch's accounts are
-- locked first, in user_id order as writers of several accounts lock them,
-- and only then is anything deleted (on Citus a deletion of copies holds
-- locks on the home_feed shards, which a post waits for while it holds its
-- account's lock). Under the lock an activity goes only if it is still past
-- the reach: one undone and done again since it was picked stays.
CREATE OR REPLACE FUNCTION trim_feeds(p_retention interval, p_batch integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    cutoff       timestamptz := now() - p_retention;
    picked       feed_row[];
    actor        text;
    broadcasting text[] := '{}';  -- the batch's accounts that broadcast
    i            integer;
BEGIN
    SELECT coalesce(array_agg(ROW(a.entry_id, a.actor_id, a.reason, a.item_time)::feed_row), '{}') INTO picked
    FROM (SELECT * FROM feed_activities a WHERE a.item_time < cutoff ORDER BY a.item_time LIMIT p_batch) a;
    FOR actor IN SELECT DISTINCT p.actor_id FROM unnest(picked) p ORDER BY 1 LOOP
        IF lock_feed_actor(actor, true) THEN
            broadcasting := broadcasting || actor;
        END IF;
    END LOOP;
    FOR i IN 1 .. cardinality(picked) LOOP
        PERFORM feed_remove_activity((picked[i]).actor_id, (picked[i]).entry_id, (picked[i]).reason, cutoff,
                                     (picked[i]).actor_id = ANY (broadcasting));
    END LOOP;
    RETURN cardinality(picked);
END $$;
