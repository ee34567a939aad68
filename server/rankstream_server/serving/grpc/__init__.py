"""The gRPC transport: interceptors and servicers over the shared pipeline."""
