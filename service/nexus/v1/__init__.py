"""Generated protobuf and gRPC code for nexus.v1 (see scripts/gen_protos.py)."""
