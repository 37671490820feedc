-- Replaced by own_entries_window and broadcasts_window, and by a
-- feed_remove_activity that also removes the broadcast copy
-- (db/functions/feed.sql). Dropped first: on a distributed database Citus
-- refuses to drop a distributed function after a parallel read (the copy
-- below) in the same transaction.
DROP FUNCTION IF EXISTS feed_activities_window(text, boolean, timestamptz, uuid, timestamptz, integer);
DROP FUNCTION IF EXISTS feed_remove_activity(text, uuid, feed_reason, timestamptz);

-- A copy of the broadcasters' activities (docs/feed.md), which every follower's
-- page reads at read time. On Citus it is a reference table, held by every
-- node, so a page reads it on its viewer's worker; it stays small, since only
-- the few accounts with feed_broadcast_followers() followers broadcast, and
-- maintenance trims it with feed_activities.
CREATE TABLE broadcast_activities (
    actor_id  text NOT NULL,
    entry_id  uuid NOT NULL,
    reason    feed_reason NOT NULL,
    item_time timestamptz NOT NULL,
    PRIMARY KEY (actor_id, entry_id, reason)
);
CREATE INDEX broadcast_activities_newest ON broadcast_activities (actor_id, item_time, entry_id);

INSERT INTO broadcast_activities (actor_id, entry_id, reason, item_time)
SELECT a.actor_id, a.entry_id, a.reason, a.item_time
FROM feed_activities a JOIN feed_actors f ON f.user_id = a.actor_id
WHERE f.broadcast;
