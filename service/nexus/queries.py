"""Every SQL statement the service runs, named in one place.

Each is a single call of a stored function (db/*.sql), so each RPC is one
database round trip.
"""

CREATE_ENTRY = "SELECT * FROM create_entry($1, $2, $3, $4, $5, $6, $7, $8, $9)"
GET_ENTRIES = "SELECT * FROM get_entries($1, $2, $3)"
DELETE_ENTRY = "SELECT delete_entry($1, $2)"
APPLY_REACTIONS = "SELECT * FROM apply_reactions($1, $2, $3, $4)"
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

APPLY_TOKEN_OPERATIONS = "SELECT * FROM apply_token_operations($1, $2, $3, $4, $5, $6, $7)"
GET_BALANCES = "SELECT * FROM get_balances($1)"
LIST_TRANSACTIONS = "SELECT * FROM list_transactions($1, $2, $3)"
RECONCILE_BALANCES = "SELECT * FROM reconcile_balances($1)"
