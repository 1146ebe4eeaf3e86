"""What the provider runs: pretraining, shadow curation, the Grad-Transformer and its training."""
