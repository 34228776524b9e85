"""The transports: gRPC servicers, access control, metrics."""
