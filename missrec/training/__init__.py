"""Training: the fine-tuning loop, levers, one pre-training module per family that has one, the run path."""
