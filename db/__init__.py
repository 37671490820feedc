"""The SQL migrations (NNNN_name.sql), applied in order; shipped in the wheel as nexus.schema."""
