-- The home feed (docs/feed.md). feed_activities is what each account puts in
-- its followers' feeds: the root entries it wrote and the entries it
-- amplified. home_feed is those activities copied into each follower's feed
-- (fan-out on write), for every account but broadcasters, whose activities
-- their followers read at read time (fan-out on read). feed_actors holds, per
-- account, whether it broadcasts; its row is also the lock that orders an
-- account's new activities against follows and unfollows of it.
CREATE TYPE feed_reason AS ENUM ('authored', 'amplified');
-- One row of a feed source, as list_home_feed merges them.
CREATE TYPE feed_row AS (entry_id uuid, actor_id text, reason feed_reason, item_time timestamptz);

CREATE TABLE feed_actors (
    user_id   text PRIMARY KEY,
    broadcast boolean NOT NULL DEFAULT false
);

CREATE TABLE feed_activities (
    actor_id  text NOT NULL,
    entry_id  uuid NOT NULL,
    reason    feed_reason NOT NULL,
    item_time timestamptz NOT NULL,
    -- Whether it was copied into the followers' feeds (the account did not broadcast then).
    fanned_out boolean NOT NULL,
    PRIMARY KEY (actor_id, entry_id, reason)
);
CREATE INDEX feed_activities_newest ON feed_activities (actor_id, item_time, entry_id);
-- The oldest activities first, for trimming past the feed's reach.
CREATE INDEX feed_activities_oldest ON feed_activities (item_time);

CREATE TABLE home_feed (
    reader_id text NOT NULL,
    entry_id  uuid NOT NULL,
    actor_id  text NOT NULL,
    reason    feed_reason NOT NULL,
    item_time timestamptz NOT NULL,
    PRIMARY KEY (reader_id, entry_id, actor_id, reason)
);
CREATE INDEX home_feed_newest ON home_feed (reader_id, item_time, entry_id);

-- A follow of a broadcaster is marked, so a reader finds the broadcasters it
-- follows among its own follows.
ALTER TABLE follows ADD COLUMN broadcast boolean NOT NULL DEFAULT false;
CREATE INDEX follows_broadcasters ON follows (follower_id) WHERE broadcast;

-- What exists already: every root entry and amplification is an activity,
-- copied into the feed of every follower of its account.
INSERT INTO feed_activities (actor_id, entry_id, reason, item_time, fanned_out)
SELECT author_id, entry_id, 'authored'::feed_reason, create_time, true FROM entries WHERE depth = 0 AND delete_time IS NULL
UNION ALL
SELECT user_id, entry_id, 'amplified'::feed_reason, create_time, true FROM reactions WHERE kind = 'amplification';
INSERT INTO home_feed (reader_id, entry_id, actor_id, reason, item_time)
SELECT f.follower_id, a.entry_id, a.actor_id, a.reason, a.item_time
FROM feed_activities a JOIN follows f ON f.followed_id = a.actor_id;
