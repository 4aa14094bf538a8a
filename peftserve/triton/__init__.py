"""Glue shared by the Triton Python-backend models (importable only inside Triton: it uses pb_utils)."""
