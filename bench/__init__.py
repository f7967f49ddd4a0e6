"""`make bench`: benchmarks of eagercache that write docs/benchmarks.md from the runs they just did."""
