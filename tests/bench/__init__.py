"""Tests of the bench package (the benchmarks' shared code and their small-scale behaviour)."""
