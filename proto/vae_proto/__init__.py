"""Generated protobuf and gRPC stubs of vae.v1 (checked in; regenerate with `make proto`)."""
