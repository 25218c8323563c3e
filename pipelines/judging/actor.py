"""The judging actor: one backend (engine or client) per Ray Data actor; requests -> judgments."""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
import pyarrow as pa

from pipelines.judging.identity import JudgeIdentity
from pipelines.judging.prompts import judge_prompt, parse_logprobs, parse_structured, preference
from pipelines.llm.backends import (
    Answer,
    Message,
    answer_with_retries,
    load_backend,
)
from storage_schemas import JUDGMENTS


class PairJudge:
    """Ray Data actor: one backend (engine or client) per actor; request rows -> judgments."""

    def __init__(self, identity: JudgeIdentity, run_id: str) -> None:
        judge = identity.judge
        self.identity = identity
        self.backend = load_backend(judge)
        self.run_id = run_id
        self.parse = (
            functools.partial(parse_logprobs, min_mass=judge.min_choice_probability)
            if judge.verdict == "logprobs"
            else parse_structured
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        rows = batch.to_pylist()
        answers: list[Answer | None] = [None] * len(rows)
        by_sample: dict[int, list[int]] = defaultdict(list)
        for i, row in enumerate(rows):
            by_sample[row["sample"]].append(i)
        for sample, members in by_sample.items():
            prompts = [self._prompt(rows[i]) for i in members]
            sampled = answer_with_retries(
                self.backend,
                prompts,
                self.identity.sampling(sample),
                self.parse,
                self.identity.judge.max_retries,
            )
            for i, answer in zip(members, sampled, strict=True):
                answers[i] = answer
        seconds = (time.perf_counter() - started) / max(len(rows), 1)
        return judgment_rows(self.identity, rows, answers, seconds, self.run_id)

    def _prompt(self, row: dict[str, Any]) -> list[Message]:
        examples = orjson.loads(row["example_rows"]) if row.get("example_rows") else []
        attributes = orjson.loads(row["attributes"]) if row.get("attributes") else None
        return judge_prompt(
            self.identity,
            row["history"],
            row["chosen"],
            row["rejected"],
            row["ordering"],
            examples,
            attributes,
        )


def judgment_rows(
    identity: JudgeIdentity,
    requests: Sequence[dict[str, Any]],
    answers: Sequence[Answer | None],
    seconds: float,
    run_id: str,
) -> pa.Table:
    """``judgments`` rows for answered requests (source, pair_id, ordering, sample, examples)."""
    now = datetime.now(UTC)
    out = []
    for request, answer in zip(requests, answers, strict=True):
        assert answer is not None
        pref, p_chosen = (None, None)
        if answer.error is None:
            pref, p_chosen = preference(request["ordering"], answer.value)
        out.append(
            {
                "source": request["source"],
                "pair_id": request["pair_id"],
                "model": identity.judge.model,
                "template_hash": identity.template_hash,
                "params_hash": identity.params_hash,
                "ordering": request["ordering"],
                "sample": request["sample"],
                "judge": identity.judge.name,
                "template": identity.template.version,
                "valid": answer.error is None,
                "invalid_reason": answer.error,
                "winner": answer.value.winner if answer.error is None else None,
                "preference": pref,
                "p_chosen": p_chosen,
                "output": answer.text,
                "examples": request.get("examples") or [],
                "attempts": answer.attempts,
                "prompt_tokens": answer.prompt_tokens,
                "output_tokens": answer.output_tokens,
                "seconds": seconds,
                "judge_run_id": run_id,
                "judged_at": now,
            }
        )
    return pa.Table.from_pylist(out, schema=JUDGMENTS.schema)


def request_rows(batch: pa.Table, missing: pa.Table) -> pa.Table:
    """One row per missing (ordering, sample) of each pair of ``batch``, a pair's rows next to
    each other in batch order: the engine's prefix cache then still holds the conversation when
    the second order of a pair comes (Arrow's join does not promise an order)."""
    keys = batch.select(["source", "pair_id"]).append_column(
        "row", pa.array(np.arange(batch.num_rows), pa.int64())
    )
    wanted = keys.join(missing, ["source", "pair_id"], join_type="inner").sort_by(
        [("row", "ascending"), ("ordering", "ascending"), ("sample", "ascending")]
    )
    rows = batch.take(wanted["row"])
    return rows.append_column("ordering", wanted["ordering"]).append_column(
        "sample", wanted["sample"]
    )


def attach_attributes(batch: pa.Table, values: dict[tuple[str, str], str]) -> pa.Table:
    """Add the ``attributes`` column (JSON of the pair's valid attributes, or null)."""
    keys = zip(batch["source"].to_pylist(), batch["pair_id"].to_pylist(), strict=True)
    return batch.append_column("attributes", pa.array([values.get(k) for k in keys], pa.string()))
