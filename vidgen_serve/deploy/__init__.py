"""Deployment tooling: Kubernetes (KubeRay) manifests rendered from the repository's serve config."""
