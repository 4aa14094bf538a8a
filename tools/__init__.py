"""Operator tools for peftserve: the CLI (``python -m tools``: serve, adapter and model releases, metrics),
demo and SmolLM2 assets, the Triton launcher, benchmarks and GPU checks."""
