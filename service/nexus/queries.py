"""Every SQL statement the service runs, named in one place.

Each is a :class:`Query`: the stored function it calls (db/functions/) and
its SQL, a single call of that function, so each RPC is one database round
trip. ``Database`` and ``GroupCommit`` take a Query, and log it by its
function's name. A call of more than four arguments names them (PostgreSQL's
named notation, ``p_user_id => $1``): a reordered signature then fails loudly
instead of writing the wrong column.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Query:
    name: str
    """The stored function the statement calls (for a plain read, the table):
    its name in logs and metrics."""
    sql: str


# The created entry as its author is shown it (entry_as_seen: a root the author may not see is not named).
CREATE_ENTRY = Query(
    "create_entry",
    "SELECT seen.* FROM create_entry("
    "p_author_id => $1, p_parent_entry_id => $2, p_type => $3, p_title => $4, p_content => $5, p_privacy => $6,"
    " p_tags => $7, p_metadata => $8, p_request_id => $9) AS created"
    " CROSS JOIN LATERAL entry_as_seen(created, $1) AS seen"
)
GET_ENTRIES = Query("get_entries", "SELECT * FROM get_entries($1, $2, $3)")
DELETE_ENTRY = Query("delete_entry", "SELECT delete_entry($1, $2)")
APPLY_REACTIONS = Query("apply_reactions", "SELECT * FROM apply_reactions($1, $2, $3, $4, $5)")
RECORD_SHARE = Query("record_share", "SELECT * FROM record_share($1, $2, $3)")
BRANCH_TREE = Query(
    "branch_tree",
    "SELECT * FROM branch_tree(p_entry_id => $1, p_viewer => $2, p_max_depth => $3, p_after => $4, p_limit => $5)"
)
ENTRY_COUNTS = Query("entry_counts", "SELECT * FROM entry_counts($1, $2)")
LIST_HOME_FEED = Query(
    "list_home_feed",
    "SELECT * FROM list_home_feed(p_viewer => $1, p_after_time => $2, p_after_entry => $3, p_limit => $4,"
    " p_retention => $5)"
)
USER_INTERACTION_STATES = Query("user_interaction_states", "SELECT * FROM user_interaction_states($1, $2)")
LIST_REACTORS = Query(
    "list_reactors",
    "SELECT * FROM list_reactors("
    "p_kind => $1, p_entry_id => $2, p_viewer => $3, p_after_time => $4, p_after_user => $5, p_limit => $6)"
)
RECORD_INTERACTION = Query("record_interaction", "SELECT * FROM record_interaction($1, $2, $3, $4)")
LIST_INTERACTIONS = Query(
    "list_interactions",
    "SELECT * FROM list_interactions("
    "p_user_id => $1, p_action => $2, p_after_time => $3, p_after_target => $4, p_limit => $5)"
)
RECONCILE_ENTRY_COUNTERS = Query("reconcile_entry_counters", "SELECT * FROM reconcile_entry_counters($1)")

FOLLOW = Query("follow", "SELECT follow($1, $2)")
UNFOLLOW = Query("unfollow", "SELECT unfollow($1, $2)")
FOLLOW_COUNTS = Query("follow_counts", "SELECT * FROM follow_counts($1)")
FOLLOW_STATES = Query("follow_states", "SELECT * FROM follow_states($1, $2)")
LIST_FOLLOWERS = Query("list_followers", "SELECT * FROM list_followers($1, $2, $3, $4)")
LIST_FOLLOWING = Query("list_following", "SELECT * FROM list_following($1, $2, $3, $4)")
RECONCILE_FOLLOW_COUNTERS = Query("reconcile_follow_counters", "SELECT * FROM reconcile_follow_counters($1)")

APPLY_TOKEN_OPERATIONS = Query(
    "apply_token_operations",
    "SELECT * FROM apply_token_operations(p_route_user_id => $1, p_user_ids => $2, p_ops => $3,"
    " p_counterparties => $4, p_amounts => $5, p_reasons => $6, p_reference_ids => $7, p_request_ids => $8,"
    " p_pending_ids => $9, p_timeouts => $10, p_linked => $11)"
)
GET_BALANCES = Query("get_balances", "SELECT * FROM get_balances($1, $2)")
SET_ACCOUNT_POLICY = Query("set_account_policy", "SELECT * FROM set_account_policy($1, $2, $3)")
EXPIRE_PENDING_TRANSFERS = Query("expire_pending_transfers", "SELECT expire_pending_transfers($1)")
LIST_TRANSACTIONS = Query("list_transactions", "SELECT * FROM list_transactions($1, $2, $3)")
RECONCILE_BALANCES = Query("reconcile_balances", "SELECT * FROM reconcile_balances($1)")

# Group commit: one memory_create composite per CreateMemory.
CREATE_MEMORIES = Query("create_memories", "SELECT * FROM create_memories($1, $2::memory_create[])")
GET_MEMORY = Query("get_memory", "SELECT * FROM get_memory($1, $2)")
UPDATE_MEMORY = Query(
    "update_memory",
    "SELECT update_memory(p_user_id => $1, p_memory_id => $2, p_fields => $3, p_content => $4, p_thread_id => $5,"
    " p_session_id => $6, p_memory_trace_id => $7, p_gravity_score => $8, p_emotion_type => $9, p_entities => $10,"
    " p_meta_tags => $11, p_temporal_type => $12, p_identity_anchor => $13, p_embedding => $14)"
)
DELETE_MEMORY = Query("delete_memory", "SELECT delete_memory($1, $2)")
LIST_MEMORIES = Query(
    "list_memories",
    "SELECT d FROM list_memories(p_user_id => $1, p_since => $2, p_min_gravity => $3, p_emotion_type => $4,"
    " p_thread_id => $5, p_session_id => $6, p_tags_any => $7, p_anchors_only => $8, p_after_time => $9,"
    " p_after_id => $10, p_limit => $11) AS d"
)
SEARCH_MEMORIES = Query(
    "search_memories",
    "SELECT * FROM search_memories("
    "p_user_id => $1, p_embedding => $2, p_query => $3, p_metric => $4, p_top_k => $5, p_min_gravity => $6,"
    " p_since => $7, p_emotion_type => $8, p_vector_weight => $9, p_exact_max => $10, p_recency_weight => $11,"
    " p_gravity_weight => $12)"
)
MEMORY_VECTOR_INDEXES_DUE = Query("memory_vector_indexes_due", "SELECT * FROM memory_vector_indexes_due($1, $2)")
# The one statement that is not a function call: a count maintenance reads.
MEMORY_USERS_ABOVE = Query("memory_users", "SELECT count(*) FROM memory_users WHERE memory_count > $1")
LIST_ARCS = Query("list_arcs", "SELECT d FROM list_arcs($1, $2, $3, $4) AS d")
SET_IDENTITY_ENTITIES = Query("set_identity_entities", "SELECT set_identity_entities($1, $2)")
MEMORY_STREAM_POSITION = Query("memory_stream_position", "SELECT * FROM memory_stream_position($1)")
MEMORY_EVENTS_AFTER = Query("memory_events_after", "SELECT * FROM memory_events_after($1, $2, $3)")
PUBLISH_BROADCAST = Query("pg_notify", "SELECT pg_notify(broadcasts_channel(), $1)")
TOUCH_SESSION = Query("touch_session", "SELECT * FROM touch_session($1, $2, $3)")
LIST_SESSIONS = Query(
    "list_sessions",
    "SELECT * FROM list_sessions(p_user_id => $1, p_status => $2, p_after_time => $3, p_after_id => $4, p_limit => $5)"
)
RECORD_PATTERN = Query("record_pattern", "SELECT * FROM record_pattern($1, $2, $3)")
LIST_PATTERNS = Query(
    "list_patterns",
    "SELECT * FROM list_patterns("
    "p_user_id => $1, p_pattern_type => $2, p_after_intensity => $3, p_after_type => $4, p_limit => $5)"
)
TRIM_FEEDS = Query("trim_feeds", "SELECT trim_feeds($1, $2)")
RUN_MAINTENANCE = Query(
    "run_maintenance",
    "SELECT * FROM run_maintenance(p_interval => $1, p_event_retention => $2, p_request_retention => $3,"
    " p_cache_ttl => $4, p_arc_dormant_after => $5, p_batch => $6)"
)
