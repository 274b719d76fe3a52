"""The gRPC adapter: translation between the wire and the engine, and server assembly."""
