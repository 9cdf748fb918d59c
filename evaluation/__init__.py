"""Measured quality and disentanglement: metrics, probes, suites and an HTML report.

`python -m evaluation --checkpoint CKPT --suite synthetic|real --out DIR` (README, "Evaluation");
repeat `--checkpoint` or use `--compare NAME=CKPT` to score several checkpoints side by side.
"""
