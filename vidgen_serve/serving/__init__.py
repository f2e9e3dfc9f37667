"""Serving layer: Ray Serve deployments, the router and its failover policy."""
