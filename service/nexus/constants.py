"""Values the service and the database must agree on, each written once here.

The database's side of each is an IMMUTABLE SQL function of the same meaning
(db/functions/common.sql), which every SQL place uses; tests/operations/test_constants.py
reads those and asserts they equal these.
"""

from __future__ import annotations

# NOTIFY channels: the wake-up hint of a user's new events (SQL
# memory_events_channel()) and the ephemeral broadcasts (broadcasts_channel()).
EVENTS_CHANNEL = "nexus_memory_events"
BROADCASTS_CHANNEL = "nexus_broadcasts"

# Advisory lock keys, arbitrary and fixed, one per job that must run on one
# replica at a time: every migrator; the maintenance run (SQL
# maintenance_lock_key(), taken inside run_maintenance); the vector-index builds.
MIGRATION_LOCK_KEY = 7_160_813_371_205
MAINTENANCE_LOCK_KEY = 7_160_813_371_206
VECTOR_INDEX_LOCK_KEY = 7_160_813_371_207

# Memory embeddings' dimension when NEXUS_EMBEDDING_DIM is not set. The SQL
# side is the memories.embedding column, sized by the migrator from the
# setting (db/0001_baseline.sql).
DEFAULT_EMBEDDING_DIM = 384
