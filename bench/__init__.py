"""Benchmarks of the Session Manager against a bare grpc.aio baseline."""
