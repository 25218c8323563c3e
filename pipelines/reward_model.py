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

import copy
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

Message = dict[str, str]
HEURISTIC_PREFIX = "heuristic:"
HEURISTICS = ("length",)
DEFAULT_MAX_LENGTH = 4096


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
    max_length: int | None = 4096
    """Tokens read per conversation; ``None``: the length the model was trained with (the
    tokenizer's ``model_max_length``, which training sets), else ``DEFAULT_MAX_LENGTH``."""
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
        from transformers import AutoModelForSequenceClassification

        self._tokenizer = load_tokenizer(self.name)
        if self.max_length is None:
            trained = self._tokenizer.model_max_length
            self.max_length = trained if trained < 10**7 else DEFAULT_MAX_LENGTH
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
        for batch in length_batches(lengths, self.batch_tokens):
            inputs = self._tokenizer.pad(
                {"input_ids": [encoded[i] for i in batch]}, return_tensors="pt"
            ).to(self.device)
            with torch.inference_mode():
                logits = self._model(**inputs).logits[:, 0]
            rewards[batch] = logits.float().cpu().numpy()
        return Scores(rewards, lengths, full > self.max_length)


def load_tokenizer(name: str, **kwargs: Any) -> Any:
    """A reward model's tokenizer: truncation from the left, EOS as padding when it has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    tokenizer.truncation_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_backbone(backbone: str, seed: int = 0, **kwargs: Any) -> Any:
    """``backbone`` as a one-output sequence classifier in fp32; a new head is seeded."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(
        backbone, num_labels=1, dtype=torch.float32, **kwargs
    )


def save_reward_model(
    model: Any,
    tokenizer: Any,
    folder: str | Path,
    state_dict: dict[str, Any] | None = None,
    normalisation: tuple[float, float] | None = None,
    max_length: int | None = None,
) -> str:
    """Write a reward model folder in HF format that ``RewardModel`` and serving load as is.

    ``normalisation`` (reward mean, std) goes into the config, as OpenRLHF does, so scores can be
    normalised wherever the model is used; ``max_length`` (the training length) becomes the
    tokenizer's ``model_max_length``. A GGUF-loaded model holds dequantised weights but
    refuses to save: it is rebuilt from its config without the quantization entry.
    """
    config = copy.deepcopy(model.config)
    config.pad_token_id = tokenizer.pad_token_id
    if normalisation is not None:
        config.reward_mean, config.reward_std = normalisation
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
        weights = state_dict if state_dict is not None else model.state_dict()
        model, state_dict = type(model)(config), None
        model.load_state_dict(weights)
    model.config = config
    model.save_pretrained(folder, state_dict=state_dict)
    if max_length is not None:
        tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(folder)
    return str(folder)


def init_reward_model(backbone: str, folder: str | Path, seed: int = 0, **kwargs: Any) -> str:
    """Save ``backbone`` with a new seeded one-output head as a reward model folder (with
    ``kwargs`` such as ``gguf_file`` passed to ``from_pretrained``)."""
    model = load_backbone(backbone, seed, **kwargs)
    return save_reward_model(model, load_tokenizer(backbone, **kwargs), folder)


def model_version(name: str) -> str:
    """What identifies a model's weights: for a local folder, a fingerprint of its weight
    files (names, sizes, modification times: retraining changes it); else the name."""
    folder = Path(name)
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    if not files:
        return name
    stamp = "|".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    return hashlib.blake2b(stamp.encode(), digest_size=8).hexdigest()


def length_batches(
    lengths: np.ndarray, batch_tokens: int, group_by_length: bool = True
) -> list[np.ndarray]:
    """Indices packed into batches whose padded size (members x longest) is within
    ``batch_tokens``; grouped by ascending length unless ``group_by_length`` is off (then in
    input order, which pads each batch to a random long member)."""
    order = np.argsort(lengths, kind="stable") if group_by_length else np.arange(len(lengths))
    batches, start = [], 0
    while start < len(order):
        end = start + 1
        longest = lengths[order[start]]
        while end < len(order):
            longest = max(longest, lengths[order[end]])
            if (end - start + 1) * longest > batch_tokens:
                break
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


def sigmoid(x: np.ndarray) -> np.ndarray:
    """p(chosen beats rejected) from r_chosen - r_rejected, stable for large |x|."""
    return np.where(x >= 0, 1 / (1 + np.exp(-x)), np.exp(x) / (1 + np.exp(x)))
