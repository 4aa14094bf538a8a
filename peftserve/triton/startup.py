"""What every model of the repository does first in ``initialize()``, so both start alike."""

from __future__ import annotations

import faulthandler
import gc
import logging

from peftserve.config import ServeConfig, triton_model_config


def start_model(args: dict) -> ServeConfig:
    """Crash stacks and logs into the server log, then the model's validated settings (shared by both models)."""
    faulthandler.enable()  # a crash of this stub prints every thread's Python stack into the server log
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return triton_model_config(args)


def freeze_startup_objects() -> None:
    """Leave what start-up made (torch, transformers, the model and its engine: ~400,000 objects with the demo
    model) out of the garbage collector's full collections, each of which walked all of them for ~170 ms while
    holding the GIL: a stall of every running stream, whenever adapter loads had allocated enough to trigger
    one (measured on 2 cores; docs/benchmarks.md). Collects first, so no garbage is frozen with them."""
    gc.collect()
    gc.freeze()
