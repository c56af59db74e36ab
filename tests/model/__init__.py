"""Model server tests: real ONNX Runtime sessions, real gRPC servers on loopback, real Parquet."""
