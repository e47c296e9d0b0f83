"""Benchmarks: scripts that print figures (never timed tests). Run one as `python -m bench.NAME`
from the repository root; `bench.common` holds what they share."""
