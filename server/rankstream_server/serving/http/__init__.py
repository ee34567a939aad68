"""The HTTP transport: one module per dialect over the shared pipeline."""
