"""Cluster-ready state: the async job store (SQLite / Redis) and the artifact store (directory / S3)."""
