"""Preference attributes of a pair, written by an LLM and validated against a schema.

The paper labels every pair with a 5-tuple before judging and retrieval: the task category
(Magpie's taxonomy), objectivity, controversiality, the attributes a good response should have,
and a guideline specific to this instance. The annotator reads the conversation (the prompt of
the pair) and answers with a JSON object; the answer is repaired where that is safe (code fences
around it, case of the enumerated values), validated by ``Attributes``, asked again with the
validation errors when it is still invalid, and recorded as an invalid row with the errors after
``max_retries``. One row per (pair, annotator key): a re-run annotates only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines.core.actor_pool import missing_rows, run_on_pairs
from pipelines.core.config import JudgingConfig, LLMConfig
from pipelines.core.errors import ConfigError
from pipelines.core.jobs import PairsSummary, TableVersion, versions
from pipelines.core.lake import Lake
from pipelines.core.selection import select_pair_keys
from pipelines.core.sql import literal
from pipelines.core.text import prompt_text
from pipelines.llm.backends import Generation, Message, Sampling, answer_with_retries, load_backend
from storage_schemas import ATTRIBUTES, CONTROVERSIALITY, OBJECTIVITY, PAIRS, TASK_CATEGORIES

log = logging.getLogger(__name__)

ATTRIBUTE_FIELDS = (
    "task_category",
    "objectivity",
    "controversiality",
    "desired_attributes",
    "guideline",
)


class Attributes(BaseModel):
    """The schema an annotation must satisfy."""

    model_config = ConfigDict(extra="forbid")

    task_category: Literal[TASK_CATEGORIES]  # type: ignore[valid-type]
    objectivity: Literal[OBJECTIVITY]  # type: ignore[valid-type]
    controversiality: Literal[CONTROVERSIALITY]  # type: ignore[valid-type]
    desired_attributes: list[str] = Field(min_length=1, max_length=8)
    guideline: str = Field(min_length=10, max_length=2000)


SYSTEM = (
    "You annotate conversations between a user and an AI assistant for a preference dataset. "
    "Reply with one JSON object and nothing else."
)
INSTRUCTION = (
    "[Conversation]\n{conversation}\n\n"
    "Describe what the assistant's next response should achieve, as a JSON object with exactly "
    "these keys:\n"
    '- "task_category": one of ' + ", ".join(f'"{c}"' for c in TASK_CATEGORIES) + "\n"
    '- "objectivity": "objective" (one correct answer) or "subjective"\n'
    '- "controversiality": "low", "medium" or "high"\n'
    '- "desired_attributes": a list of 1 to 8 short qualities a good response has\n'
    '- "guideline": one or two sentences on how to judge responses to this conversation'
)
TEMPLATES = {"attributes-v1": (SYSTEM, INSTRUCTION)}


def template_hash(version: str) -> str:
    if version not in TEMPLATES:
        raise ConfigError(f"unknown attributes template {version!r}; known: {', '.join(TEMPLATES)}")
    return hashlib.blake2b(json.dumps(TEMPLATES[version]).encode(), digest_size=8).hexdigest()


def annotator_key(config: LLMConfig, version: str) -> str:
    """The cache identity of an annotator: model, template and sampling parameters."""
    parts = [
        config.model,
        template_hash(version),
        config.temperature,
        config.top_p,
        config.max_tokens,
        config.seed,
    ]
    return hashlib.blake2b(json.dumps(parts).encode(), digest_size=8).hexdigest()


def annotation_prompt(version: str, history: list[Message]) -> list[Message]:
    system, instruction = TEMPLATES[version]
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": instruction.format(conversation=prompt_text(history))},
    ]


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)
_CANONICAL = {
    "task_category": {c.lower().replace(" and ", " & "): c for c in TASK_CATEGORIES},
    "objectivity": {v: v for v in OBJECTIVITY},
    "controversiality": {v: v for v in CONTROVERSIALITY},
}


def parse_attributes(generation: Generation) -> Attributes:
    """The validated attributes in an answer, or ``ValueError`` saying what is wrong."""
    text = generation.text
    fenced = _FENCE.search(text)
    text = fenced.group(1) if fenced else text
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        raise ValueError("unparseable: no JSON object in the answer")
    try:
        value = json.loads(text[start : end + 1])
    except ValueError as exc:
        raise ValueError(f"unparseable: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("unparseable: the JSON is not an object")
    for key, canonical in _CANONICAL.items():  # repair: case and "and" for "&" only
        if isinstance(value.get(key), str):
            folded = value[key].strip().lower().replace(" and ", " & ")
            value[key] = canonical.get(folded, value[key])
    try:
        return Attributes.model_validate(value)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'object'}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(f"schema: {problems}"[:500]) from None


def valid_attributes(lake: Lake, key: str) -> list[dict[str, Any]]:
    """(source, pair_id and the five fields) of every valid row of annotator ``key``."""
    if not lake.exists(ATTRIBUTES.name):
        return []
    columns = ["source", "pair_id", *ATTRIBUTE_FIELDS]
    return lake.read(
        ATTRIBUTES.name, columns=columns, where=f"annotator_key = {literal(key)} AND valid"
    ).to_pylist()


class PairAnnotator:
    """Ray Data actor: one backend per actor; pairs -> ``attributes`` rows."""

    def __init__(self, config: LLMConfig, version: str, run_id: str) -> None:
        self.config, self.version, self.run_id = config, version, run_id
        self.key, self.hash = annotator_key(config, version), template_hash(version)
        self.backend = load_backend(config)

    def __call__(self, batch: pa.Table) -> pa.Table:
        histories = batch["history"].to_pylist()
        sampling = Sampling(
            self.config.temperature, self.config.top_p, self.config.max_tokens, self.config.seed
        )
        answers = answer_with_retries(
            self.backend,
            [annotation_prompt(self.version, h) for h in histories],
            sampling,
            parse_attributes,
            self.config.max_retries,
        )
        now = datetime.now(UTC)
        rows = []
        for source, pair_id, answer in zip(
            batch["source"].to_pylist(), batch["pair_id"].to_pylist(), answers, strict=True
        ):
            fields = answer.value.model_dump() if answer.error is None else {}
            rows.append(
                {
                    "source": source,
                    "pair_id": pair_id,
                    "annotator_key": self.key,
                    "model": self.config.model,
                    "template": self.version,
                    "template_hash": self.hash,
                    "valid": answer.error is None,
                    "invalid_reason": answer.error,
                    **{f: fields.get(f) for f in ATTRIBUTE_FIELDS},
                    "output": answer.text,
                    "attempts": answer.attempts,
                    "prompt_tokens": answer.prompt_tokens,
                    "output_tokens": answer.output_tokens,
                    "annotate_run_id": self.run_id,
                    "annotated_at": now,
                }
            )
        return pa.Table.from_pylist(rows, schema=ATTRIBUTES.schema)


@dataclass(frozen=True)
class AnnotateSummary(PairsSummary):
    job: ClassVar[str] = "annotate"
    annotator_key: str
    pairs_version: int
    selected: int
    cached: int
    annotated: int
    invalid: int
    invalid_reasons: dict[str, int]
    output_tokens: int
    seconds: float
    attributes_version: int | None

    def text(self) -> str:
        lines = [
            f"annotated {self.annotated:,} of {self.selected:,} selected pairs in "
            f"{self.seconds:.1f}s (annotator {self.annotator_key})",
            f"  already annotated {self.cached:>10,}",
            f"  invalid           {self.invalid:>10,}",
        ]
        lines += [f"    {reason:<15} {n:>10,}" for reason, n in self.invalid_reasons.items()]
        if self.annotated >= 4 and self.invalid >= 0.9 * self.annotated:
            lines.append(
                f"  WARNING: {self.invalid:,} of {self.annotated:,} answers are invalid: the "
                "annotator cannot do this task. Use a stronger model (docs/judging.md, "
                "'Real judges')."
            )
        return "\n".join(lines)

    def tables_written(self) -> list[TableVersion]:
        return versions((ATTRIBUTES, self.attributes_version))

    def tags(self) -> dict[str, str]:
        return {"synpref.annotator_key": self.annotator_key}

    def metrics(self) -> dict[str, float]:
        return {
            "pairs_selected": self.selected,
            "pairs_annotated": self.annotated,
            "pairs_cached": self.cached,
            "annotations_invalid": self.invalid,
            "invalid_rate": self.invalid / self.annotated if self.annotated else 0.0,
            "output_tokens": self.output_tokens,
        }


def annotate_pairs(
    lake: Lake,
    config: JudgingConfig,
    run_id: str,
    where: str | None = None,
    limit: int | None = None,
    retry_rejected: bool = False,
) -> AnnotateSummary:
    """Annotate the pairs matching ``where`` (the ``limit`` with the smallest pair_id) that
    ``config.annotator`` has not annotated (failed requests of earlier runs are tried again,
    and rejected ones when ``retry_rejected``)."""
    started = time.perf_counter()
    annotator, template = config.annotator, config.annotator_template
    key = annotator_key(annotator, template)
    pairs_version = lake.version(PAIRS.name)
    selected = select_pair_keys(lake, pairs_version, where, limit)
    mine = f"annotator_key = {literal(key)}"
    missing = missing_rows(lake, ATTRIBUTES, selected, mine, retry_rejected)
    log.info(
        f"[annotate] {selected.num_rows:,} pairs selected, {missing.num_rows:,} without "
        f"attributes from {annotator.model}"
    )
    new, version_written = ATTRIBUTES.schema.empty_table(), None
    if missing.num_rows:
        stage = run_on_pairs(
            "annotate",
            lake,
            pairs_version,
            ["source", "pair_id", "history"],
            missing,
            PairAnnotator,
            (annotator, template, run_id),
            ("annotator", annotator),
            ATTRIBUTES,
            lambda rows: lake.upsert(ATTRIBUTES, rows).version,
            in_process=annotator.in_process(missing.num_rows),
        )
        new, version_written = stage.rows, stage.version
    reasons = [r.split(":")[0] for r in new["invalid_reason"].to_pylist() if r]
    seconds = time.perf_counter() - started
    log.info(f"[annotate] {new.num_rows:,} pairs annotated in {seconds:.1f}s")
    return AnnotateSummary(
        annotator_key=key,
        pairs_version=pairs_version,
        selected=selected.num_rows,
        cached=selected.num_rows - missing.num_rows,
        annotated=new.num_rows,
        invalid=len(reasons),
        invalid_reasons={r: reasons.count(r) for r in sorted(set(reasons))},
        output_tokens=int(pc.sum(new["output_tokens"]).as_py() or 0),
        seconds=seconds,
        attributes_version=version_written,
    )
