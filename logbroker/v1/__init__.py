"""Generated protobuf and gRPC stubs (made by proto/generate.py; do not edit)."""
