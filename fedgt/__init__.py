"""fedgt: federated improvement of a large LM from small-LM LoRA updates (see README.md)."""
