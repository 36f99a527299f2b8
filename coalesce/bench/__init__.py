"""Thundering-herd benchmarks behind `coalesce bench`."""
