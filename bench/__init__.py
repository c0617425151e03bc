"""Benchmarks (results in BENCHMARKS.md). A package, so the scripts import each other and the test harness as
`bench.x` and `tests.x`: run them from the repository root as `python -m bench.<name>`, or as
`python bench/<name>.py` with the repository on PYTHONPATH (bench/gpu.sh sets it on a machine where the package
is not installed)."""
