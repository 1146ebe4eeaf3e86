"""What every party shares: models, data, LoRA, the update vector, the training loop, DP mechanisms."""
