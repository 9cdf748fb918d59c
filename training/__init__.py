"""Meta-learning and few-shot fine-tuning of the `model` networks (paper Section 3)."""
