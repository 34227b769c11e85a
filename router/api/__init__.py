"""The router's doors: gRPC front door and HTTP admin."""
