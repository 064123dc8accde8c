"""Generated gRPC stubs for lstmserve.v1 (scripts/gen_protos.sh). Do not edit."""
