"""Deployment: Triton model repository export, embedded tritonserver, container manifests."""
