"""Benchmarks, their benchmark-only code (baselines, proxy-tuning, simulated organizations) and scenario files."""
