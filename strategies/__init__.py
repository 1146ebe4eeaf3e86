"""Flower server strategies for fedgt (the Grad-Transformer strategy arrives with the federation issue)."""
