"""Triton Inference Server: model repository export, Python-backend runtime, embedded server."""
