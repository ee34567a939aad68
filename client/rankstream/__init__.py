"""rankstream client: typed Python access to the rankstream gRPC service."""
