"""What the daemon and its clients assume when told nothing: addresses, and the files here.

``pool.yaml`` is the embedded cluster of ``hetero-router up``; ``policy.yaml`` the
scheduling policy when none is named.
"""

# The gRPC front door (HETERO_ROUTER_GRPC_ADDRESS), where the SDK and CLI look first.
GRPC_ADDRESS = "127.0.0.1:50051"
# The HTTP door: OpenAI-compatible routes, metrics and probes (HETERO_ROUTER_HTTP_ADDRESS).
HTTP_ADDRESS = "127.0.0.1:8080"
