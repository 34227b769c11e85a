"""The `peers` scenario's parts: the peer routers' environment, their launchers, the raw
gRPC relay that is the gRPC door's floor, and the judgement of the figures."""
