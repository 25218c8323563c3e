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
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import ray
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines.core.config import LLMConfig
from pipelines.core.lake import Lake
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
        raise ValueError(f"unknown attributes template {version!r}; known: {', '.join(TEMPLATES)}")
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


def valid_attributes(lake: Lake, key: str) -> list[dict[str, Any]]:
    """(source, pair_id and the five fields) of every valid row of annotator ``key``."""
    if not lake.exists(ATTRIBUTES.name):
        return []
    columns = ["source", "pair_id", *ATTRIBUTE_FIELDS]
    return lake.read(
        ATTRIBUTES.name, columns=columns, where=f"annotator_key = '{key}' AND valid"
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
class Annotation:
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


def annotate_pairs(
    lake: Lake,
    config: LLMConfig,
    version: str,
    run_id: str,
    selected: pa.Table,
    pairs_version: int,
) -> Annotation:
    """Annotate the ``selected`` pairs (source, pair_id) that this annotator has not annotated
    (failed requests of earlier runs are tried again)."""
    started = time.perf_counter()
    key = annotator_key(config, version)
    missing = selected
    if lake.exists(ATTRIBUTES.name):
        done = lake.read(
            ATTRIBUTES.name,
            columns=["source", "pair_id"],
            where=f"annotator_key = '{key}' AND (invalid_reason IS NULL OR "
            "invalid_reason NOT LIKE 'request_failed%')",
        )
        missing = selected.join(done, ["source", "pair_id"], join_type="left anti")
    log.info(
        f"[annotate] {selected.num_rows:,} pairs selected, {missing.num_rows:,} without "
        f"attributes from {config.model}"
    )
    new, version_written = ATTRIBUTES.schema.empty_table(), None
    if missing.num_rows:
        cpus = ray.cluster_resources().get("CPU", 0)
        if config.actors * config.num_cpus >= cpus:
            raise ValueError(
                f"annotator actors x num_cpus = {config.actors * config.num_cpus:g} takes all "
                f"{cpus:g} CPUs: use fewer actors or a fractional num_cpus (e.g. 0.5)"
            )
        annotated = lake.dataset(
            PAIRS.name, pairs_version, ["source", "pair_id", "history"], keys=missing
        ).map_batches(
            PairAnnotator,
            fn_constructor_args=(config, version, run_id),
            batch_format="pyarrow",
            batch_size=config.batch_size,
            compute=ray.data.ActorPoolStrategy(size=config.actors),
            num_cpus=config.num_cpus,
            num_gpus=config.num_gpus or None,
        )
        parts = [t for t in ray.get(annotated.to_arrow_refs()) if t.num_rows]
        new = pa.concat_tables(parts) if parts else ATTRIBUTES.schema.empty_table()
        if new.num_rows != missing.num_rows:
            raise RuntimeError(f"{new.num_rows} attribute rows for {missing.num_rows} pairs")
        version_written = lake.upsert(ATTRIBUTES, new).version
    reasons = [r.split(":")[0] for r in new["invalid_reason"].to_pylist() if r]
    seconds = time.perf_counter() - started
    log.info(f"[annotate] {new.num_rows:,} pairs annotated in {seconds:.1f}s")
    return Annotation(
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
