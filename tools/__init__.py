"""Operator tools for peftserve: demo assets, the Triton launcher and (later) the adapter CLI."""
