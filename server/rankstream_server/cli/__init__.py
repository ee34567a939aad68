"""The `rankstream` command, the demo and `rankstream eval`."""
