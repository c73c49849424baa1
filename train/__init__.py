"""Training: GoPro data, the embedded synthetic set, the training loop, evaluation, DDP."""
