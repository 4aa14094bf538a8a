"""peftserve: one base causal LM, many PEFT adapters, chosen per request, batched together.

The package is independent of Triton: ``model_repository/peft_llm/1/model.py`` is the only place that
imports ``triton_python_backend_utils``; tools, validation and tests import this package directly.
"""
