"""peftserve: one base causal LM, many PEFT adapters, chosen per request, batched together.

The package is independent of Triton: only :mod:`peftserve.triton` and the two ``model_repository/*/1/model.py``
files import ``triton_python_backend_utils``; tools, validation and tests import the rest directly.
"""
