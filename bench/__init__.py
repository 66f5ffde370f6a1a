"""Benchmarks: `python -m bench <scenario> [--quick] [--out DIR]` (see bench/run.py) and the older per-model scripts."""
