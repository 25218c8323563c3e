"""Packing variable-length items into batches of bounded padded size (scoring, LLM prompts)."""

from __future__ import annotations

import numpy as np


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
