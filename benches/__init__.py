"""`make bench`: every hot path side by side with the alternative a user would otherwise use.

Run from the repository root: `python -m benches` (all), `python -m benches --only inference`, `--quick`.
The table format is `benches.common`; each `bench_*.py` module exposes `lines(args) -> list[BenchLine]`.
"""
