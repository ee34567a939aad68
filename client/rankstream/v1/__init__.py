"""Generated from protos/rankstream/v1/*.proto by `make proto`; do not edit the *_pb2* files."""
