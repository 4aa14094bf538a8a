"""The built-in checks, in the order they run; each takes a ValidationContext and records findings."""

from validation.checks.architecture import check_architecture
from validation.checks.files import check_files
from validation.checks.schema import check_schema
from validation.checks.serving import check_serving, check_smoke_load
from validation.checks.tokenizer import check_tokenizer
from validation.checks.weights import check_weights

BUILTIN_CHECKS = [
    check_files,
    check_schema,
    check_architecture,
    check_tokenizer,
    check_weights,
    check_serving,
    check_smoke_load,
]

__all__ = ["BUILTIN_CHECKS"]
