"""The weightless ``peft_llm`` forwarder imports no model stack (torch, transformers)."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import MODEL_REPOSITORY


def test_the_forwarder_imports_neither_torch_nor_transformers() -> None:
    source = (MODEL_REPOSITORY / "peft_llm" / "1" / "model.py").read_text()
    modules = sorted(
        {
            node.module
            for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("peftserve")
        }
    )
    assert "peftserve.triton.io" in modules
    # pb_utils exists only inside Triton: a stand-in module lets the forwarder's own imports run here.
    script = (
        "import sys, types\n"
        "sys.modules['triton_python_backend_utils'] = types.ModuleType('triton_python_backend_utils')\n"
        + "".join(f"import {module}\n" for module in modules)
        + "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))\n"
    )
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"
