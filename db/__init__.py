"""The SQL schema: numbered migrations (NNNN_name.sql) applied once each, then the stored functions
(functions/*.sql) re-applied when they change; shipped in the wheel as nexus.schema."""
