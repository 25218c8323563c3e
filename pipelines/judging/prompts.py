"""A judge's prompt for one pair and order, and reading the verdict back from its answer."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.core.text import prompt_text
from pipelines.judging.identity import JudgeIdentity
from pipelines.judging.templates import PREFILL, Template
from pipelines.llm.backends import (
    Generation,
    Message,
)
from storage_schemas import JUDGE_ORDERS


def conversation_text(history: Sequence[Message]) -> str:
    return prompt_text(history) or "(empty)"


def _shown(ordering: str, chosen: str, rejected: str) -> tuple[str, str]:
    return (chosen, rejected) if ordering == "AB" else (rejected, chosen)


def _example_text(template: Template, example: dict[str, Any]) -> str:
    """A gold pair as a solved example; which side is A is fixed by its pair_id (no position
    pattern for the judge to copy)."""
    ordering = JUDGE_ORDERS[int(example["pair_id"][-1], 16) % 2]
    a, b = _shown(ordering, example["chosen"], example["rejected"])
    return template.example.format(
        conversation=conversation_text(example["history"]),
        response_a=a,
        response_b=b,
        attributes=attributes_text(example.get("attributes")),
        winner="A" if ordering == "AB" else "B",
    )


def judge_prompt(
    identity: JudgeIdentity,
    history: Sequence[Message],
    chosen: str,
    rejected: str,
    ordering: str,
    examples: Sequence[dict[str, Any]] = (),
    attributes: dict[str, Any] | None = None,
) -> list[Message]:
    """The chat messages asking ``identity``'s judge about one pair in one order."""
    template = identity.template
    a, b = _shown(ordering, chosen, rejected)
    user = template.user.format(
        examples="".join(_example_text(template, e) for e in examples),
        conversation=conversation_text(history),
        response_a=a,
        response_b=b,
        attributes=attributes_text(attributes),
    )
    messages = [{"role": "system", "content": template.system}, {"role": "user", "content": user}]
    if identity.judge.verdict == "logprobs":
        messages.append({"role": "assistant", "content": PREFILL})
    return messages


@dataclass(frozen=True)
class Choice:
    winner: str
    """``A``, ``B`` or ``tie`` (positions as shown)."""
    p_a: float | None
    """P(A) / (P(A) + P(B)) from the choice tokens, when read from log-probabilities."""


_WINNERS = {"a": "A", "b": "B", "tie": "tie"}
_JSON_OBJECT = re.compile(r"\{[^{}]*\}")


def parse_structured(generation: Generation) -> Choice:
    """The first ``{"winner": ...}`` object in the answer, or ``ValueError`` with the reason."""
    for match in _JSON_OBJECT.finditer(generation.text):
        try:
            value = json.loads(match.group())
        except ValueError:
            continue
        if isinstance(value, dict) and "winner" in value:
            winner = _WINNERS.get(str(value["winner"]).strip().lower())
            if winner is None:
                raise ValueError(
                    f'unparseable: winner must be "A", "B" or "tie", got {value["winner"]!r}'
                )
            return Choice(winner, None)
    raise ValueError('unparseable: no {"winner": ...} JSON object in the answer')


def parse_logprobs(generation: Generation, min_mass: float = 0.0) -> Choice:
    """The choice from the first token's probabilities of ``A``, ``B`` and ``tie``; invalid
    when they hold less than ``min_mass`` of the probability (the model was not choosing)."""
    if not generation.first_logprobs:
        raise ValueError("no_logprobs: the backend returned no log-probabilities")
    mass = dict.fromkeys(("A", "B", "tie"), 0.0)
    for token, logprob in generation.first_logprobs.items():
        if token.strip() in mass:
            mass[token.strip()] += float(np.exp(logprob))
    if mass["A"] + mass["B"] == 0:
        raise ValueError(
            "choice_tokens_missing: neither A nor B among the first token's top "
            f"log-probabilities (answer {generation.text!r})"
        )
    if sum(mass.values()) < min_mass:
        raise ValueError(
            f"choice_mass_low: A, B and tie hold {sum(mass.values()):.3f} of the first token's "
            f"probability, below {min_mass} (answer {generation.text!r})"
        )
    return Choice(max(mass, key=mass.__getitem__), mass["A"] / (mass["A"] + mass["B"]))


def preference(ordering: str, choice: Choice) -> tuple[str, float]:
    """(chosen / rejected / tie, p_chosen) of a choice made in ``ordering``."""
    if choice.winner == "tie":
        pref = "tie"
    else:
        pref = "chosen" if (choice.winner == "A") == (ordering == "AB") else "rejected"
    if choice.p_a is not None:
        return pref, choice.p_a if ordering == "AB" else 1 - choice.p_a
    return pref, {"chosen": 1.0, "rejected": 0.0, "tie": 0.5}[pref]


def attributes_text(attributes: dict[str, Any] | None) -> str:
    """The attributes as prompt lines for a judge ('' when there are none)."""
    if not attributes:
        return ""
    return (
        "[Attributes]\n"
        f"Task category: {attributes['task_category']}\n"
        f"Objectivity: {attributes['objectivity']}\n"
        f"Controversiality: {attributes['controversiality']}\n"
        f"Desired attributes: {', '.join(attributes['desired_attributes'])}\n"
        f"Guideline: {attributes['guideline']}\n\n"
    )
