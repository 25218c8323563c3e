"""Labels with lineage: every decision on a pair is an event, and a pair's label is derived.

``label_events`` is append-only. A decision (a human's answer, a judge panel's verdict, a
Stage 2 rule) is one ``LabelEvent``; its id is a digest of the pair, origin, author and the
decision's own key (a Label Studio annotation, a loop step), so recording the same decision
again adds nothing. An undo is an event that revokes another. Raw pairs are never changed:
``derive_labels`` reads the events and gives each labelled pair its current label and pool,
which ``rebuild_labels`` writes to the ``labels`` table.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from pipelines.core.errors import SelectionError
from pipelines.core.lake import Lake, WriteResult
from pipelines.core.sql import literal
from storage_schemas import LABEL_EVENTS, LABELS, LABELS_KNOWN

PRECEDENCE = {"human": 3, "llm-judge": 2, "rm-consistency": 1, "recycled": 1, "original": 0}
"""Which origin decides a pair's label when it has several: a human over the judges over the
Stage 2 rule over the original label; within an origin the latest decision (humans: the
majority of each annotator's latest answer)."""


@dataclass(frozen=True)
class LabelEvent:
    """One decision on one pair. ``decision`` names the decision itself (a Label Studio
    annotation, a loop step): the same decision recorded twice is one event."""

    source: str
    pair_id: str
    label: str | None
    origin: str
    who: str
    decision: str
    loop: str | None = None
    iteration: int | None = None
    step: str | None = None
    confidence: float | None = None
    evidence: Mapping[str, Any] = field(default_factory=dict)
    read_versions: Mapping[str, int] = field(default_factory=dict)
    revokes: str | None = None

    @property
    def event_id(self) -> str:
        key = "\0".join([self.source, self.pair_id, self.origin, self.who, self.decision])
        return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


def event_rows(events: Iterable[LabelEvent], run_id: str | None) -> pa.Table:
    """The ``label_events`` rows of ``events`` (unique on their ids)."""
    now = datetime.now(UTC)
    rows = {
        e.event_id: {
            "event_id": e.event_id,
            "source": e.source,
            "pair_id": e.pair_id,
            "label": e.label,
            "origin": e.origin,
            "who": e.who,
            "loop": e.loop,
            "iteration": e.iteration,
            "step": e.step,
            "confidence": e.confidence,
            "evidence": json.dumps(dict(e.evidence), sort_keys=True, allow_nan=False),
            "read_versions": json.dumps(dict(e.read_versions), sort_keys=True),
            "revokes": e.revokes,
            "run_id": run_id,
            "decided_at": now,
        }
        for e in events
    }
    return pa.Table.from_pylist(list(rows.values()), LABEL_EVENTS.schema)


def record_events(lake: Lake, events: Iterable[LabelEvent], run_id: str | None) -> WriteResult:
    """Append the events not recorded yet (one Delta commit; none when all are known)."""
    return lake.insert_new(LABEL_EVENTS, event_rows(events, run_id))


def undo(lake: Lake, event_id: str, who: str, reason: str, run_id: str | None) -> LabelEvent:
    """Revoke event ``event_id``: the pair's label falls back to its other events."""
    rows = lake.read(LABEL_EVENTS.name, where=f"event_id = {literal(event_id)}").to_pylist()
    if not rows:
        raise SelectionError(f"no label event {event_id!r}")
    if rows[0]["revokes"] is not None:
        raise SelectionError(f"{event_id} is an undo itself; revoke the event it undid instead")
    undo_event = LabelEvent(
        rows[0]["source"],
        rows[0]["pair_id"],
        None,
        rows[0]["origin"],
        who,
        f"undo:{event_id}",
        evidence={"reason": reason},
        read_versions={LABEL_EVENTS.name: lake.version(LABEL_EVENTS.name)},
        revokes=event_id,
    )
    record_events(lake, [undo_event], run_id)
    return undo_event


def live_events(lake: Lake, version: int | None = None, where: str | None = None) -> pa.Table:
    """The events (matching ``where``) that no undo revoked, undo events left out."""
    if not lake.exists(LABEL_EVENTS.name):
        return LABEL_EVENTS.schema.empty_table()
    events = lake.read(LABEL_EVENTS.name, version, where=where)
    revoked = set(events["revokes"].drop_null().to_pylist())
    return pa.Table.from_pylist(
        [e for e in events.to_pylist() if e["revokes"] is None and e["event_id"] not in revoked],
        LABEL_EVENTS.schema,
    )


def derive_labels(events: pa.Table, human_sources: Collection[str]) -> pa.Table:
    """Each pair's current label and pool from its live events (``LABELS`` rows).

    Pools: a human keep or flip makes D_gold, a judges' keep or flip D_silver, a discard
    ``discarded``; otherwise a pair stays in D_un (sources in ``human_sources``) or D_wild."""
    by_pair: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for event in events.to_pylist():
        by_pair.setdefault((event["source"], event["pair_id"]), []).append(event)
    rows = []
    for (source, pair_id), pair_events in sorted(by_pair.items()):
        top = max(PRECEDENCE[e["origin"]] for e in pair_events)
        deciding = [e for e in pair_events if PRECEDENCE[e["origin"]] == top]
        label, confidence, event = _decide(deciding)
        rows.append(
            {
                "source": source,
                "pair_id": pair_id,
                "label": label,
                "pool": _pool(label, event["origin"], source in human_sources),
                "origin": event["origin"],
                "event_id": event["event_id"],
                "confidence": confidence,
                "events": len(pair_events),
            }
        )
    return pa.Table.from_pylist(rows, LABELS.schema)


def _decide(events: list[dict[str, Any]]) -> tuple[str, float | None, dict[str, Any]]:
    """Label, confidence and deciding event among events of one origin: the latest, or for
    humans the majority of each annotator's latest answer (a tie is ``unsure``)."""
    latest: dict[str, dict[str, Any]] = {}
    for event in sorted(events, key=lambda e: (e["decided_at"], e["event_id"])):
        latest[event["who"]] = event
    if events[0]["origin"] != "human":
        event = max(events, key=lambda e: (e["decided_at"], e["event_id"]))
        return event["label"], event["confidence"], event
    answers = Counter(e["label"] for e in latest.values())
    (label, votes), *rest = answers.most_common()
    if rest and rest[0][1] == votes:
        label = "unsure"
    event = max(
        (e for e in latest.values() if e["label"] == label),
        key=lambda e: (e["decided_at"], e["event_id"]),
        default=max(latest.values(), key=lambda e: (e["decided_at"], e["event_id"])),
    )
    return label, votes / len(latest), event


def _pool(label: str, origin: str, human_source: bool) -> str:
    assert label in LABELS_KNOWN, label
    if label == "discard":
        return "discarded"
    if label in ("keep", "flip") and origin == "human":
        return "D_gold"
    if label in ("keep", "flip") and origin == "llm-judge":
        return "D_silver"
    return "D_un" if human_source else "D_wild"


def rebuild_labels(lake: Lake, human_sources: Collection[str]) -> WriteResult:
    """Make ``labels`` hold the current label of every pair with a live event (changed rows
    rewritten; the same labels make no commit)."""
    labels = derive_labels(live_events(lake), human_sources)
    compare = ("label", "pool", "origin", "event_id", "confidence", "events")
    return lake.replace_decisions(LABELS, labels, compare)


def explain(lake: Lake, pair_id: str) -> pa.Table:
    """Every event of a pair (undos and revoked ones included), oldest first."""
    if not lake.exists(LABEL_EVENTS.name):
        return LABEL_EVENTS.schema.empty_table()
    events = lake.read(LABEL_EVENTS.name, where=f"pair_id = {literal(pair_id)}")
    return events.sort_by([("decided_at", "ascending"), ("event_id", "ascending")])
