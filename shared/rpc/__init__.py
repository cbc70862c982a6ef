"""gRPC stubs of the control plane, generated from proto/kvrelay.proto by codegen.py."""
