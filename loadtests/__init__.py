"""Load tests and benchmarks through Triton: perf_analyzer sweeps, locust users, and the report."""
