"""Every SQL statement the service runs, named in one place.

Each is a single call of a stored function (db/*.sql), so each RPC is one
database round trip. A call of more than four arguments names them
(PostgreSQL's named notation, ``p_user_id => $1``): a reordered signature then
fails loudly instead of writing the wrong column.
"""

# The created entry as its author is shown it (db/0005_privacy.sql: a root the author may not see is not named).
CREATE_ENTRY = (
    "SELECT seen.* FROM create_entry("
    "p_author_id => $1, p_parent_entry_id => $2, p_type => $3, p_title => $4, p_content => $5, p_privacy => $6,"
    " p_tags => $7, p_metadata => $8, p_request_id => $9) AS created"
    " CROSS JOIN LATERAL entry_as_seen(created, $1) AS seen"
)
GET_ENTRIES = "SELECT * FROM get_entries($1, $2, $3)"
DELETE_ENTRY = "SELECT delete_entry($1, $2)"
APPLY_REACTIONS = "SELECT * FROM apply_reactions_v3($1, $2, $3, $4)"
RECORD_SHARE = "SELECT * FROM record_share($1, $2, $3)"
BRANCH_TREE = (
    "SELECT * FROM branch_tree(p_entry_id => $1, p_viewer => $2, p_max_depth => $3, p_after => $4, p_limit => $5)"
)
ENTRY_COUNTS = "SELECT * FROM entry_counts($1, $2)"
USER_INTERACTION_STATES = "SELECT * FROM user_interaction_states($1, $2)"
LIST_REACTORS = (
    "SELECT * FROM list_reactors("
    "p_kind => $1, p_entry_id => $2, p_viewer => $3, p_after_time => $4, p_after_user => $5, p_limit => $6)"
)
RECORD_INTERACTION = "SELECT * FROM record_interaction($1, $2, $3, $4)"
LIST_INTERACTIONS = (
    "SELECT * FROM list_interactions("
    "p_user_id => $1, p_action => $2, p_after_time => $3, p_after_target => $4, p_limit => $5)"
)
RECONCILE_ENTRY_COUNTERS = "SELECT * FROM reconcile_entry_counters($1)"

FOLLOW = "SELECT follow($1, $2)"
UNFOLLOW = "SELECT unfollow($1, $2)"
FOLLOW_COUNTS = "SELECT * FROM follow_counts($1)"
FOLLOW_STATES = "SELECT * FROM follow_states($1, $2)"
LIST_FOLLOWERS = "SELECT * FROM list_followers($1, $2, $3, $4)"
LIST_FOLLOWING = "SELECT * FROM list_following($1, $2, $3, $4)"
RECONCILE_FOLLOW_COUNTERS = "SELECT * FROM reconcile_follow_counters($1)"

APPLY_TOKEN_OPERATIONS = (
    "SELECT * FROM apply_token_operations_v2(p_user_id => $1, p_ops => $2, p_counterparties => $3,"
    " p_amounts => $4, p_reasons => $5, p_reference_ids => $6, p_request_ids => $7)"
)
GET_BALANCES = "SELECT * FROM get_balances($1)"
LIST_TRANSACTIONS = "SELECT * FROM list_transactions($1, $2, $3)"
RECONCILE_BALANCES = "SELECT * FROM reconcile_balances($1)"

# Group commit: one memory_create composite per CreateMemory.
CREATE_MEMORIES = "SELECT * FROM create_memories($1, $2::memory_create[])"
GET_MEMORY = "SELECT * FROM get_memory($1, $2)"
UPDATE_MEMORY = (
    "SELECT update_memory(p_user_id => $1, p_memory_id => $2, p_fields => $3, p_content => $4, p_thread_id => $5,"
    " p_session_id => $6, p_memory_trace_id => $7, p_gravity_score => $8, p_emotion_type => $9, p_entities => $10,"
    " p_meta_tags => $11, p_temporal_type => $12, p_identity_anchor => $13, p_embedding => $14)"
)
DELETE_MEMORY = "SELECT delete_memory($1, $2)"
LIST_MEMORIES = (
    "SELECT d FROM list_memories(p_user_id => $1, p_since => $2, p_min_gravity => $3, p_emotion_type => $4,"
    " p_thread_id => $5, p_session_id => $6, p_tags_any => $7, p_anchors_only => $8, p_after_time => $9,"
    " p_after_id => $10, p_limit => $11) AS d"
)
SEARCH_MEMORIES = (
    "SELECT * FROM search_memories("
    "p_user_id => $1, p_embedding => $2, p_query => $3, p_metric => $4, p_top_k => $5, p_min_gravity => $6,"
    " p_since => $7, p_emotion_type => $8, p_vector_weight => $9, p_exact_max => $10, p_recency_weight => $11,"
    " p_gravity_weight => $12)"
)
MEMORY_VECTOR_INDEXES_DUE = "SELECT * FROM memory_vector_indexes_due($1, $2)"
MEMORY_USERS_ABOVE = "SELECT count(*) FROM memory_users WHERE memory_count > $1"
LIST_ARCS = "SELECT d FROM list_arcs($1, $2, $3, $4) AS d"
SET_IDENTITY_ENTITIES = "SELECT set_identity_entities($1, $2)"
MEMORY_STREAM_POSITION = "SELECT * FROM memory_stream_position($1)"
MEMORY_EVENTS_AFTER = "SELECT * FROM memory_events_after($1, $2, $3)"
PUBLISH_BROADCAST = "SELECT pg_notify(broadcasts_channel(), $1)"
TOUCH_SESSION = "SELECT * FROM touch_session($1, $2, $3)"
LIST_SESSIONS = (
    "SELECT * FROM list_sessions(p_user_id => $1, p_status => $2, p_after_time => $3, p_after_id => $4, p_limit => $5)"
)
RECORD_PATTERN = "SELECT * FROM record_pattern($1, $2, $3)"
LIST_PATTERNS = (
    "SELECT * FROM list_patterns("
    "p_user_id => $1, p_pattern_type => $2, p_after_intensity => $3, p_after_type => $4, p_limit => $5)"
)
RUN_MAINTENANCE = (
    "SELECT * FROM run_maintenance(p_interval => $1, p_event_retention => $2, p_request_retention => $3,"
    " p_cache_ttl => $4, p_arc_dormant_after => $5, p_batch => $6)"
)
