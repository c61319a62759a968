"""KServe v2 gRPC protocol: the public .proto and its generated module (see generate.py)."""
