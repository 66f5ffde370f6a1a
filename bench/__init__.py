"""Benchmarks: `python -m bench <scenario> [--quick] [--out DIR]` (see bench/run.py); the older per-model
scripts and GPU checks are in bench/legacy/."""
