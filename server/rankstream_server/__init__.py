"""rankstream server: gRPC retrieve-and-rerank over transformer models."""
