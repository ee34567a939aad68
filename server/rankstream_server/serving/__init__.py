"""The gRPC front door: servicers, validation, auth, access log, metrics, TLS, lifecycle."""
