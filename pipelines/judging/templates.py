"""Versioned pairwise judge prompts. Changing any text makes a new hash, so a new cache entry."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.core.config import JudgeConfig
from pipelines.core.errors import ConfigError

PREFILL = '{"winner": "'


@dataclass(frozen=True)
class Template:
    """A versioned pairwise prompt. Changing any text makes a new hash, so a new cache entry."""

    version: str
    system: str
    user: str
    """With ``{examples}``, ``{conversation}``, ``{response_a}``, ``{response_b}``,
    ``{attributes}``."""
    example: str
    """One few-shot example, with ``{conversation}``, ``{response_a}``, ``{response_b}``,
    ``{attributes}``, ``{winner}``."""


TEMPLATES = {
    "pairwise-v1": Template(
        version="pairwise-v1",
        system=(
            "You are an impartial judge of AI assistant responses. Compare two responses to the "
            "same conversation and decide which one is better: more helpful, correct, honest "
            "and harmless. Do not let the order, the length or the style of the responses "
            "influence you."
        ),
        user=(
            "{examples}[Conversation]\n{conversation}\n\n[Response A]\n{response_a}\n\n"
            "[Response B]\n{response_b}\n\n{attributes}"
            'Which response is better? Answer with only a JSON object: {{"winner": "A"}}, '
            '{{"winner": "B"}} or {{"winner": "tie"}}.'
        ),
        example=(
            "[Example]\n[Conversation]\n{conversation}\n\n[Response A]\n{response_a}\n\n"
            '[Response B]\n{response_b}\n\n{attributes}Verdict: {{"winner": "{winner}"}}\n\n'
        ),
    ),
}


def template_for(judge: JudgeConfig) -> Template:
    try:
        return TEMPLATES[judge.template]
    except KeyError:
        raise ConfigError(
            f"judge {judge.name}: unknown template {judge.template!r}; known: "
            + ", ".join(sorted(TEMPLATES))
        ) from None
