-- The batch functions take each item's key (an entry, a user) so that one call
-- on one node carries writes of many keys; the first argument stays the key
-- Citus delegates a call by. The old signatures go; db/functions/ creates the
-- new ones.
DROP FUNCTION IF EXISTS apply_reactions(uuid, text[], reaction_kind[], text[]);
DROP FUNCTION IF EXISTS apply_token_operations(text, text[], text[], bigint[], text[], text[], text[]);
DROP FUNCTION IF EXISTS create_memories(text, memory_create[]);
