"""Reward models: any Hugging Face ``AutoModelForSequenceClassification`` with one label.

One formatting function (``format_conversation``) serves training, batch scoring and serving,
so a model scores exactly what it was trained on. It follows Skywork-Reward-V2's usage: the
tokenizer's chat template renders the conversation as is (no system prompt added by us) and a
BOS the template already wrote is removed so that the tokenizer adds exactly one. Tokenizers
without a chat template (encoders such as MiniLM) get ``role: content`` lines.

Scoring sorts conversations by length and packs them into batches under a token budget, so a
batch pads to its longest member only; inputs over ``max_length`` are cut from the left (the
final response, which is what is being judged, is kept) and counted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

Message = dict[str, str]
HEURISTIC_PREFIX = "heuristic:"
HEURISTICS = ("length",)


def format_conversation(tokenizer: Any, messages: Sequence[Message]) -> str:
    """The text a reward model reads for ``messages`` (ending with the assistant response)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(messages), tokenize=False)
        bos = tokenizer.bos_token
        if bos and text.startswith(bos) and _adds_bos(tokenizer):
            text = text[len(bos) :]
        return text
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def scored_conversation(prompt: Sequence[Message], response: str) -> list[Message]:
    """What a reward model reads for ``response`` to ``prompt``."""
    return [*prompt, {"role": "assistant", "content": response}]


def pair_conversations(
    prompts: Sequence[Sequence[Message]], chosen: Sequence[str], rejected: Sequence[str]
) -> list[list[Message]]:
    """Every pair's chosen conversation, then every rejected one (split the rewards at n)."""
    return [scored_conversation(p, c) for p, c in zip(prompts, chosen, strict=True)] + [
        scored_conversation(p, r) for p, r in zip(prompts, rejected, strict=True)
    ]


def _adds_bos(tokenizer: Any) -> bool:
    """Whether tokenizing with special tokens already starts with BOS."""
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


@dataclass(frozen=True)
class Scores:
    """Raw rewards of a list of conversations, with what the model read of each."""

    rewards: np.ndarray
    tokens: np.ndarray
    truncated: np.ndarray
    """True where the conversation was longer than ``max_length`` and cut from the left."""


@dataclass
class RewardModel:
    """A loaded reward model (HF path or id, or ``heuristic:length``) and its normalisation.

    ``reward_mean``/``reward_std`` come from the model config when training stored them
    (normalised reward = (r - mean) / std); otherwise 0 and 1.
    """

    name: str
    max_length: int = 4096
    batch_tokens: int = 16384
    device: str = "cpu"
    reward_mean: float = 0.0
    reward_std: float = 1.0
    _model: Any = None
    _tokenizer: Any = None

    def __post_init__(self) -> None:
        if self.name.startswith(HEURISTIC_PREFIX):
            heuristic = self.name.removeprefix(HEURISTIC_PREFIX)
            if heuristic not in HEURISTICS:
                raise ValueError(
                    f"unknown heuristic scorer {self.name!r}; known: "
                    + ", ".join(HEURISTIC_PREFIX + h for h in HEURISTICS)
                )
            return
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(self.name)
        self._tokenizer.truncation_side = "left"
        if self._tokenizer.pad_token is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        self._model = AutoModelForSequenceClassification.from_pretrained(
            self.name, num_labels=1, dtype=torch.float32
        ).to(self.device)
        self._model.eval()
        self._model.config.pad_token_id = self._tokenizer.pad_token_id
        config = self._model.config
        self.reward_mean = float(getattr(config, "reward_mean", 0.0))
        self.reward_std = float(getattr(config, "reward_std", 1.0)) or 1.0

    def score(self, conversations: Sequence[Sequence[Message]]) -> Scores:
        """Raw rewards (float64), one per conversation, in input order."""
        if self._model is None:  # heuristic:length, the response's length in characters
            lengths = np.array([len(c[-1]["content"]) for c in conversations], np.int64)
            none = np.zeros(len(lengths), bool)
            return Scores(lengths.astype(np.float64), np.zeros_like(lengths), none)
        import torch

        texts = [format_conversation(self._tokenizer, c) for c in conversations]
        encoded = self._tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
        full = np.array([len(ids) for ids in encoded], np.int64)
        encoded = [ids[-self.max_length :] for ids in encoded]
        lengths = np.minimum(full, self.max_length)
        rewards = np.empty(len(texts), np.float64)
        for batch in _length_batches(lengths, self.batch_tokens):
            inputs = self._tokenizer.pad(
                {"input_ids": [encoded[i] for i in batch]}, return_tensors="pt"
            ).to(self.device)
            with torch.inference_mode():
                logits = self._model(**inputs).logits[:, 0]
            rewards[batch] = logits.float().cpu().numpy()
        return Scores(rewards, lengths, full > self.max_length)


def init_reward_model(backbone: str, folder: str | Path, seed: int = 0, **kwargs: Any) -> str:
    """Save ``backbone`` with a new seeded one-output head as a reward model folder (the start
    of training; with ``kwargs`` such as ``gguf_file`` passed to ``from_pretrained``)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1, **kwargs)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(backbone, **kwargs).save_pretrained(folder)
    return str(folder)


def model_version(name: str) -> str:
    """What identifies a model's weights: for a local folder, a fingerprint of its weight
    files (names, sizes, modification times: retraining changes it); else the name."""
    folder = Path(name)
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    if not files:
        return name
    stamp = "|".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    return hashlib.blake2b(stamp.encode(), digest_size=8).hexdigest()


def _length_batches(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Indices grouped by ascending length, each group's padded size within ``batch_tokens``."""
    order = np.argsort(lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end - start + 1) * lengths[order[end]] <= batch_tokens:
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


def sigmoid(x: np.ndarray) -> np.ndarray:
    """p(chosen beats rejected) from r_chosen - r_rejected, stable for large |x|."""
    return np.where(x >= 0, 1 / (1 + np.exp(-x)), np.exp(x) / (1 + np.exp(x)))
