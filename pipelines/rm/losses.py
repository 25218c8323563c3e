"""Pairwise reward-model losses, computed in fp32 whatever the model's precision.

``bradley_terry``: −log σ(r_w − r_l − margin), the paper's loss (margin 0). ``log_exp``:
log(1 + exp(r_l − r_w)), OpenRLHF's ``LogExpLoss``: the same function written the other way,
kept so that configs ported from OpenRLHF mean what they say; both use the stable softplus form.
Options: a per-pair ``margin`` (Llama-2's margin loss), per-pair ``weights`` (a weighted mean),
and TRL's reward centering, ``coefficient · mean((r_w + r_l)²)``, which keeps rewards near zero.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

LossKind = Literal["bradley_terry", "log_exp"]


def pairwise_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    kind: LossKind = "bradley_terry",
    margin: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    centering: float = 0.0,
    normaliser: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss of a batch of pairs.

    ``normaliser`` is the total weight the sum is divided by (default: this batch's); training
    passes the weight of the whole global batch so that micro-batches and workers add up to the
    global batch mean, however the pairs were split.
    """
    r_chosen, r_rejected = r_chosen.float(), r_rejected.float()
    difference = r_chosen - r_rejected
    if kind == "bradley_terry":
        if margin is not None:
            difference = difference - margin.float()
        per_pair = F.softplus(-difference)
    elif kind == "log_exp":
        if margin is not None:
            raise ValueError("log_exp has no margin; use bradley_terry with a margin")
        per_pair = F.softplus(r_rejected - r_chosen)
    else:
        raise ValueError(f"unknown loss {kind!r}; known: bradley_terry, log_exp")
    if centering:
        per_pair = per_pair + centering * (r_chosen + r_rejected) ** 2
    weights = torch.ones_like(per_pair) if weights is None else weights.float()
    total = weights.sum() if normaliser is None else normaliser
    return (weights * per_pair).sum() / total
