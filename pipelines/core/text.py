"""Conversations and their text: the ``Message`` type, a history as one prompt text, and the
normalisation shared by dedup, near-dedup and decontamination.

Unicode NFC, every run of whitespace collapsed to one space, ends stripped, optionally case
folded; n-gram methods work on the words (``\\w+``) of the case-folded text.
"""

from __future__ import annotations

import re
import unicodedata

_WORD = re.compile(r"\w+")

Message = dict[str, str]
"""One chat message: ``{"role": ..., "content": ...}`` (roles user, assistant, system)."""


def prompt_text(history: list[Message]) -> str:
    """A history as ``role: content`` lines: the text that prompts are grouped, retrieved and
    judged by."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in history)


def normalise_text(text: str, casefold: bool = False) -> str:
    text = " ".join(unicodedata.normalize("NFC", text).split())
    return text.casefold() if casefold else text


def tokens(text: str) -> list[str]:
    """The words of the normalised, case-folded text: the unit of n-grams and shingles."""
    return _WORD.findall(normalise_text(text, casefold=True))
