"""Reward models: any Hugging Face ``AutoModelForSequenceClassification`` with one label.

One formatting function (``format_conversation``) serves training, batch scoring and serving,
so a model scores exactly what it was trained on. It follows Skywork-Reward-V2's usage: the
tokenizer's chat template renders the conversation as is (no system prompt added by us) and a
BOS the template already wrote is removed so that the tokenizer adds exactly one. Tokenizers
without a chat template (encoders such as MiniLM) get ``role: content`` lines.

Scoring sorts conversations by length and packs them into batches under a token budget, so a
batch pads to its longest member only. The length a model reads is the smallest of the configured
``max_length``, the tokenizer's ``model_max_length`` (which training sets to the length it trained
with) and the model's position limit (``effective_max_length``): training, scoring, evaluation and
serving agree on it, and a longer input can never index past the position embeddings. Longer
inputs are cut from the left, keeping the special tokens and the final response (what is being
judged), and counted.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.core.batching import length_batches
from pipelines.core.errors import ConfigError
from pipelines.core.model_paths import dequantized
from pipelines.core.text import Message

HEURISTIC_PREFIX = "heuristic:"
HEURISTICS = ("length",)
DEFAULT_MAX_LENGTH = 4096
"""Used when neither the configuration, the tokenizer nor the model names a length."""
_UNSET_LENGTH = 10**7
"""Tokenizers without a declared length report a huge ``model_max_length``; above this is unset."""
POSITION_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


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
    """Configured tokens per conversation (``None``: no limit of our own). After loading, the
    effective length: at most the tokenizer's ``model_max_length`` (the length the model was
    trained with) and the model's position limit."""
    batch_tokens: int = 1024
    """Padded tokens per forward pass (``ScoringConfig.batch_tokens`` says why so few)."""
    device: str = "cpu"
    reward_mean: float = 0.0
    reward_std: float = 1.0
    _model: Any = None
    _tokenizer: Any = None

    def __post_init__(self) -> None:
        if self.name.startswith(HEURISTIC_PREFIX):
            heuristic = self.name.removeprefix(HEURISTIC_PREFIX)
            if heuristic not in HEURISTICS:
                raise ConfigError(
                    f"unknown heuristic scorer {self.name!r}; known: "
                    + ", ".join(HEURISTIC_PREFIX + h for h in HEURISTICS)
                )
            return
        import torch
        from transformers import AutoModelForSequenceClassification

        self._tokenizer = load_tokenizer(self.name)
        self._model = AutoModelForSequenceClassification.from_pretrained(
            self.name, num_labels=1, dtype=torch.float32
        ).to(self.device)
        self.max_length = effective_max_length(self.max_length, self._tokenizer, self._model.config)
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
        encoded, full = encode(self._tokenizer, texts, self.max_length)
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


def position_limit(model_config: Any) -> int | None:
    """The number of positions the model can embed, when its config declares one."""
    for name in POSITION_ATTRIBUTES:
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def effective_max_length(configured: int | None, tokenizer: Any, model_config: Any) -> int:
    """The smallest of ``configured``, the tokenizer's ``model_max_length`` and the model's
    position limit (``DEFAULT_MAX_LENGTH`` when none is known)."""
    declared = tokenizer.model_max_length
    limits = [
        configured,
        declared if declared and declared < _UNSET_LENGTH else None,
        position_limit(model_config),
    ]
    return min((limit for limit in limits if limit), default=DEFAULT_MAX_LENGTH)


def encode(
    tokenizer: Any, texts: Sequence[str], max_length: int
) -> tuple[list[list[int]], np.ndarray]:
    """Token ids of ``texts`` (special tokens included) cut from the left to ``max_length``,
    and each text's full length. The tokenizer's own left truncation keeps the special tokens
    (an encoder's ``[CLS]``, a decoder's BOS); only the over-long texts are tokenised twice."""
    ids = tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False)
    ids = ids["input_ids"]
    full = np.array([len(i) for i in ids], np.int64)
    over = np.flatnonzero(full > max_length)
    if len(over):
        cut = tokenizer(
            [texts[i] for i in over],
            add_special_tokens=True,
            truncation=True,
            max_length=max_length,
        )["input_ids"]
        for i, short in zip(over, cut, strict=True):
            ids[i] = short
    return ids, full


def hf_source(name: str, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``name`` and its ``from_pretrained`` ``kwargs``, a local GGUF backbone (``gguf_file``)
    replaced by the folder it is dequantized into once per machine (``dequantized``): the
    driver, the tokenizing actors and every training worker load it."""
    gguf = kwargs.get("gguf_file")
    if gguf is None or not (Path(name) / gguf).is_file():
        return name, kwargs  # a GGUF in a hub repository: transformers downloads it
    return dequantized(Path(name) / gguf), {k: v for k, v in kwargs.items() if k != "gguf_file"}


def load_tokenizer(name: str, **kwargs: Any) -> Any:
    """A reward model's tokenizer: truncation from the left, EOS as padding when it has none."""
    from transformers import AutoTokenizer

    name, kwargs = hf_source(name, kwargs)
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    tokenizer.truncation_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def backbone_max_length(backbone: str, configured: int | None, **kwargs: Any) -> int:
    """The length a backbone can be trained with: ``effective_max_length`` of its tokenizer and
    config (``kwargs`` such as ``gguf_file`` go to ``from_pretrained``)."""
    from transformers import AutoConfig

    source, options = hf_source(backbone, kwargs)
    config = AutoConfig.from_pretrained(source, **options)
    return effective_max_length(configured, load_tokenizer(source, **options), config)


def load_backbone(backbone: str, seed: int = 0, **kwargs: Any) -> Any:
    """``backbone`` as a one-output sequence classifier in fp32; a new head is seeded."""
    import torch
    from transformers import AutoModelForSequenceClassification

    backbone, kwargs = hf_source(backbone, kwargs)
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(
        backbone, num_labels=1, dtype=torch.float32, **kwargs
    )


def without_dropout(model: Any) -> Any:
    """``model`` with every dropout layer at p=0 (TRL's reward trainer trains so by default)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


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


def sigmoid(x: np.ndarray) -> np.ndarray:
    """p(chosen beats rejected) from r_chosen - r_rejected, stable for large |x| (the
    two-branch numpy form computes both branches and warns of overflow)."""
    from scipy.special import expit

    return expit(x)
