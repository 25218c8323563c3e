"""What a judgment depends on, hashed: the cache key of a judge (its name is only a label)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pipelines.core.config import JudgeConfig
from pipelines.core.sql import literal
from pipelines.judging.templates import Template, template_for
from pipelines.llm.backends import Sampling

VERDICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"winner": {"type": "string", "enum": ["A", "B", "tie"]}},
    "required": ["winner"],
    "additionalProperties": False,
}
"""The answer of a ``structured`` judge, for backends that decode to a JSON schema."""


def _constrained(judge: JudgeConfig) -> bool:
    return judge.verdict == "structured" and judge.json_schema_decoding


def digest(*parts: Any) -> str:
    """A short stable hash of JSON-able parts."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def cache_predicate(model: str, template_hash: str, params_hash: str) -> str:
    """SQL selecting one judge's rows in ``judgments``."""
    return (
        f"model = {literal(model)} AND template_hash = {literal(template_hash)} "
        f"AND params_hash = {literal(params_hash)}"
    )


@dataclass(frozen=True)
class PromptInputs:
    """What a judge's prompt holds besides the pair: the gold set its few-shot examples come
    from and the annotator whose attributes it shows (each part of the judge's identity only
    for judges that use it, so a new gold set or annotator judges those pairs again)."""

    gold: str | None = None
    """Digest of the gold selection: predicate, embedder and the gold pairs' keys."""
    attributes: str | None = None
    """The annotator key of the attributes shown."""


@dataclass(frozen=True)
class JudgeIdentity:
    """What a judgment depends on, hashed: the cache key of a judge (the name is only a label)."""

    judge: JudgeConfig
    template: Template
    template_hash: str
    params_hash: str

    @classmethod
    def of(cls, judge: JudgeConfig, inputs: PromptInputs | None = None) -> JudgeIdentity:
        template = template_for(judge)
        inputs = inputs or PromptInputs()
        shape: dict[str, Any] = {"few_shot": judge.few_shot}
        shape["show_attributes"] = judge.show_attributes
        if judge.few_shot:
            shape["gold"] = inputs.gold
        if judge.few_shot or judge.show_attributes:
            shape["attributes"] = inputs.attributes
        params = {
            "verdict": judge.verdict,
            "temperature": judge.temperature,
            "top_p": judge.top_p,
            "max_tokens": 1 if judge.verdict == "logprobs" else judge.max_tokens,
            "seed": judge.seed,
            # A prompt over the limit is recorded invalid: raising it must judge those again.
            "max_prompt_tokens": judge.max_prompt_tokens,
        }
        # Newer settings enter the hash only when they change something, so that the cache of
        # judges that do not use them stays valid.
        if _constrained(judge):
            params["json_schema"] = VERDICT_SCHEMA
        if judge.min_choice_probability:
            params["min_choice_probability"] = judge.min_choice_probability
        return cls(judge, template, digest(template, shape), digest(params))

    @property
    def cache_id(self) -> tuple[str, str, str]:
        """What identifies this judge's rows in ``judgments``."""
        return (self.judge.model, self.template_hash, self.params_hash)

    @property
    def key(self) -> str:
        """The judge's key in ``verdicts``: its identity and its number of samples."""
        return digest(
            self.judge.model, self.template_hash, self.params_hash, self.judge.samples_per_order
        )

    def sql(self) -> str:
        """This judge's rows in ``judgments``."""
        return cache_predicate(*self.cache_id)

    def sampling(self, sample: int) -> Sampling:
        judge = self.judge
        logprobs = judge.verdict == "logprobs"
        return Sampling(
            temperature=judge.temperature,
            top_p=judge.top_p,
            max_tokens=1 if logprobs else judge.max_tokens,
            seed=judge.seed + sample,
            logprobs=logprobs,
            json_schema=VERDICT_SCHEMA if _constrained(judge) else None,
        )
