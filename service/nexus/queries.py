"""Every SQL statement the service runs, named in one place.

Each is a single call of a stored function (db/*.sql), so each RPC is one
database round trip.
"""

# The created entry as its author is shown it (db/0005_privacy.sql: a root the author may not see is not named).
CREATE_ENTRY = (
    "SELECT seen.* FROM create_entry($1, $2, $3, $4, $5, $6, $7, $8, $9) AS created"
    " CROSS JOIN LATERAL entry_as_seen(created, $1) AS seen"
)
GET_ENTRIES = "SELECT * FROM get_entries($1, $2, $3)"
DELETE_ENTRY = "SELECT delete_entry($1, $2)"
APPLY_REACTIONS = "SELECT * FROM apply_reactions_v2($1, $2, $3, $4)"
RECORD_SHARE = "SELECT * FROM record_share($1, $2, $3)"
BRANCH_TREE = "SELECT * FROM branch_tree($1, $2, $3, $4, $5)"
ENTRY_COUNTS = "SELECT * FROM entry_counts($1, $2)"
USER_INTERACTION_STATES = "SELECT * FROM user_interaction_states($1, $2)"
LIST_REACTORS = "SELECT * FROM list_reactors($1, $2, $3, $4, $5, $6)"
RECORD_INTERACTION = "SELECT * FROM record_interaction($1, $2, $3, $4)"
LIST_INTERACTIONS = "SELECT * FROM list_interactions($1, $2, $3, $4, $5)"
RECONCILE_ENTRY_COUNTERS = "SELECT * FROM reconcile_entry_counters($1)"

FOLLOW = "SELECT follow($1, $2)"
UNFOLLOW = "SELECT unfollow($1, $2)"
FOLLOW_COUNTS = "SELECT * FROM follow_counts($1)"
FOLLOW_STATES = "SELECT * FROM follow_states($1, $2)"
LIST_FOLLOWERS = "SELECT * FROM list_followers($1, $2, $3, $4)"
LIST_FOLLOWING = "SELECT * FROM list_following($1, $2, $3, $4)"
RECONCILE_FOLLOW_COUNTERS = "SELECT * FROM reconcile_follow_counters($1)"

APPLY_TOKEN_OPERATIONS = "SELECT * FROM apply_token_operations_v2($1, $2, $3, $4, $5, $6, $7)"
GET_BALANCES = "SELECT * FROM get_balances($1)"
LIST_TRANSACTIONS = "SELECT * FROM list_transactions($1, $2, $3)"
RECONCILE_BALANCES = "SELECT * FROM reconcile_balances($1)"

# Group commit: one memory_create composite per CreateMemory.
CREATE_MEMORIES = "SELECT * FROM create_memories($1, $2::memory_create[])"
GET_MEMORY = "SELECT * FROM get_memory($1, $2)"
UPDATE_MEMORY = "SELECT update_memory($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
DELETE_MEMORY = "SELECT delete_memory($1, $2)"
LIST_MEMORIES = "SELECT d FROM list_memories($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) AS d"
SEARCH_MEMORIES = "SELECT * FROM search_memories($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
MEMORY_VECTOR_INDEXES_DUE = "SELECT * FROM memory_vector_indexes_due($1)"
LIST_ARCS = "SELECT d FROM list_arcs($1, $2, $3, $4) AS d"
SET_IDENTITY_ENTITIES = "SELECT set_identity_entities($1, $2)"
MEMORY_STREAM_POSITION = "SELECT * FROM memory_stream_position($1)"
MEMORY_EVENTS_AFTER = "SELECT * FROM memory_events_after($1, $2, $3)"
PUBLISH_BROADCAST = "SELECT pg_notify('nexus_broadcasts', $1)"
TOUCH_SESSION = "SELECT * FROM touch_session($1, $2, $3)"
LIST_SESSIONS = "SELECT * FROM list_sessions($1, $2, $3, $4, $5)"
RECORD_PATTERN = "SELECT * FROM record_pattern($1, $2, $3)"
LIST_PATTERNS = "SELECT * FROM list_patterns($1, $2, $3, $4, $5)"
RUN_MAINTENANCE = "SELECT * FROM run_maintenance($1, $2, $3, $4, $5, $6)"
