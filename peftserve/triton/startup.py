"""What every model of the repository does first in ``initialize()``, so both start alike."""

from __future__ import annotations

import faulthandler
import logging

from peftserve.config import ServeConfig, triton_model_config


def start_model(args: dict) -> ServeConfig:
    """Crash stacks and logs into the server log, then the model's validated settings (shared by both models)."""
    faulthandler.enable()  # a crash of this stub prints every thread's Python stack into the server log
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return triton_model_config(args)
