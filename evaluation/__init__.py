"""Measured quality and disentanglement: metrics, probes, suites and an HTML report.

`python -m evaluation --checkpoint CKPT --suite synthetic --out DIR` (see README, "Evaluation").
"""
