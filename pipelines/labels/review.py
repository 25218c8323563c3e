"""Human verification in Label Studio: pairs go out as pairwise tasks, answers come back as
label events.

``push_pairs`` turns pairs into tasks that show the conversation, the two responses as
"Response 1" and "Response 2" in an order fixed by ``review.seed`` and the pair (so the order
says nothing about the stored label and a re-push shows the same one), and the pair's
attributes and guideline; a pair already in the project is not imported again.
``pull_annotations`` reads the answers (Label Studio's JSON export, from the server or from a
vendor's file), maps the shown order back to keep / flip / unsure and records them as human
``label_events``; recording the same annotation again adds nothing. It reports how often the
people agree with the original labels, with the LLM judges and with each other.

Label Studio runs as a server of its own (docs/review.md); we talk to its REST API with httpx
(``Authorization: Token``), not with label-studio-sdk, whose pins clash with ours.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.attributes.job import ATTRIBUTE_FIELDS
from pipelines.core.config import ReviewConfig, SynprefConfig
from pipelines.core.errors import FormatError, SelectionError, SynprefError
from pipelines.core.jobs import PairsSummary, TableVersion, versions
from pipelines.core.lake import Lake, WriteResult, pair_keys
from pipelines.core.sql import all_of, literal
from pipelines.labels.agreement import Agreement, among_raters, cohen
from pipelines.labels.events import (
    LabelEvent,
    derive_labels,
    event_rows,
    rebuild_labels,
    record_events,
)
from storage_schemas import ATTRIBUTES, JUDGE_ORDERS, LABEL_EVENTS, LABELS, PAIRS, VERDICTS

log = logging.getLogger(__name__)

CHOICE_NAME = "preference"
CHOICES = {"Response 1 is better": 1, "Response 2 is better": 2, "Can't decide": None}
"""The answers a task offers: the response shown first or second is better, or neither."""
HUMAN_LABELS = ("keep", "flip", "unsure")
PANEL_LABELS = {"agree": "keep", "disagree": "flip"}
"""A judge panel's verdict as a label (tie, inconsistent and invalid decide nothing)."""
BATCH = 500
"""Tasks per request to Label Studio (an import, a page of the task list)."""

_CHOICE_TAGS = "\n".join(f'    <Choice value="{choice}"/>' for choice in CHOICES)
LABEL_CONFIG = f"""<View>
  <Header value="Conversation"/>
  <Paragraphs name="history" value="$history" layout="dialogue" nameKey="role" textKey="content"/>
  <Header value="About this request"/>
  <Text name="attributes" value="$attributes"/>
  <Text name="guideline" value="$guideline"/>
  <View style="display: flex; gap: 1em">
    <View style="flex: 1">
      <Header value="Response 1"/>
      <Text name="response_1" value="$response_1"/>
    </View>
    <View style="flex: 1">
      <Header value="Response 2"/>
      <Text name="response_2" value="$response_2"/>
    </View>
  </View>
  <Choices name="{CHOICE_NAME}" toName="response_1,response_2" choice="single-radio"
           required="true">
{_CHOICE_TAGS}
  </Choices>
</View>"""
"""The pairwise labelling interface: conversation, attributes, the two responses, one choice."""


class ReviewError(SynprefError):
    """Label Studio cannot be reached or refuses a request; the message names the URL."""


def shown_order(seed: int, source: str, pair_id: str) -> str:
    """``AB`` (the chosen response shown as Response 1) or ``BA``: a coin flip fixed by the
    seed and the pair, so that the position tells the annotator nothing."""
    digest = hashlib.blake2b(f"{seed}\0{source}\0{pair_id}".encode(), digest_size=8).digest()
    return JUDGE_ORDERS[digest[0] & 1]


def label_of(choice: str | None, order: str) -> str | None:
    """The label an answer gives the pair shown in ``order``: keep when the chosen response
    was preferred, flip when the rejected one was, unsure for "Can't decide"; ``None`` for an
    answer that is not one of the choices."""
    if choice not in CHOICES:
        return None
    position = CHOICES[choice]
    if position is None:
        return "unsure"
    chosen_position = 1 if order == "AB" else 2
    return "keep" if position == chosen_position else "flip"


def task_data(
    pair: dict[str, Any],
    attributes: dict[str, Any] | None,
    seed: int,
    run_id: str | None,
    loop: str | None = None,
    iteration: int | None = None,
) -> dict[str, Any]:
    """The ``data`` of a pair's task: what the annotator sees, and the keys to map the answer
    back (source, pair_id, the shown order, the loop round)."""
    order = shown_order(seed, pair["source"], pair["pair_id"])
    first, second = (
        (pair["chosen"], pair["rejected"]) if order == "AB" else (pair["rejected"], pair["chosen"])
    )
    data = {
        "source": pair["source"],
        "pair_id": pair["pair_id"],
        "order": order,
        "history": [{"role": m["role"], "content": m["content"]} for m in pair["history"]],
        "response_1": first,
        "response_2": second,
        "attributes": _describe(attributes) if attributes else "(no attributes)",
        "guideline": attributes["guideline"] if attributes else "",
        "push_run_id": run_id,
        "loop": loop,
        "iteration": iteration,
    }
    return {k: v for k, v in data.items() if v is not None}


def _describe(attributes: dict[str, Any]) -> str:
    wanted = ", ".join(attributes["desired_attributes"] or [])
    return (
        f"{attributes['task_category']} · {attributes['objectivity']} · "
        f"controversiality {attributes['controversiality']} · wanted: {wanted}"
    )


# ------------------------------------------------------------------------------ the server


class LabelStudio:
    """The part of Label Studio's REST API that review needs, as the token's user."""

    def __init__(self, review: ReviewConfig) -> None:
        self.url, self.token_env = review.url.rstrip("/"), review.token_env
        token = os.environ.get(review.token_env)
        if not token:
            raise ReviewError(
                f"no Label Studio token: set the environment variable ${review.token_env} "
                f"(config review.token_env) to your API token from {self.url} "
                "(Account & Settings, legacy token)"
            )
        self.http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Token {token}"},
            timeout=review.timeout_s,
        )

    def __enter__(self) -> LabelStudio:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One request; its JSON answer, or a ``ReviewError`` that says what to check."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ReviewError(
                f"Label Studio at {self.url} did not answer {method} {path} "
                f"({type(exc).__name__}: {exc}): is the server running at review.url? "
                "(docs/review.md shows how to start it)"
            ) from None
        if response.status_code == 401:
            raise ReviewError(
                f"Label Studio at {self.url} refused the token in ${self.token_env} "
                f"({method} {path}: 401): check the token, and that the server accepts legacy "
                "tokens (LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true)"
            )
        if response.is_error:
            raise ReviewError(
                f"Label Studio at {self.url}: {method} {path} failed with "
                f"{response.status_code}: {response.text[:300]}"
            )
        try:
            return response.json()
        except ValueError:
            kind = response.headers.get("content-type", "no content type")
            raise ReviewError(
                f"{self.url} answered {method} {path} with {kind}, not Label Studio's JSON: is "
                f"review.url the address of Label Studio? ({response.text[:200]!r})"
            ) from None

    def find_project(self, title: str) -> int | None:
        """The id of the (oldest) project titled exactly ``title``."""
        ids, page = [], 1
        while page:
            found = self.call("GET", "/api/projects", params={"title": title, "page": page})
            ids += [p["id"] for p in found["results"] if p["title"] == title]
            page = page + 1 if found["next"] else 0
        return min(ids, default=None)

    def create_project(self, title: str) -> int:
        project = {
            "title": title,
            "description": "Pairwise review of preference pairs (synpref review push)",
            "label_config": LABEL_CONFIG,
        }
        return self.call("POST", "/api/projects", json=project)["id"]

    def tasks(self, project: int) -> Iterator[dict[str, Any]]:
        """The project's tasks (data and annotation counts), page by page."""
        seen, page = 0, 1
        while True:
            params = {"project": project, "page": page, "page_size": BATCH}
            found = self.call("GET", "/api/tasks", params=params)
            yield from found["tasks"]
            seen += len(found["tasks"])
            if not found["tasks"] or seen >= found["total"]:
                return
            page += 1

    def import_tasks(self, project: int, tasks: list[dict[str, Any]]) -> None:
        for start in range(0, len(tasks), BATCH):
            batch = tasks[start : start + BATCH]
            self.call("POST", f"/api/projects/{project}/import", json=batch)

    def export(self, project: int) -> list[dict[str, Any]]:
        """The annotated tasks in Label Studio's JSON export format, each annotation's
        ``completed_by`` expanded to the annotator's id and email."""
        tasks = self.call("GET", f"/api/projects/{project}/export", params={"exportType": "JSON"})
        users = self.call("GET", f"/api/projects/{project}/annotators/")
        emails = {user["id"]: user["email"] for user in users}
        for task in tasks:
            for annotation in task["annotations"]:
                user = annotation["completed_by"]
                annotation["completed_by"] = {"id": user, "email": emails.get(user)}
        return tasks


# ------------------------------------------------------------------------------ push


@dataclass
class ReviewPushSummary(PairsSummary):
    job: ClassVar[str] = "review_push"
    project: str | None
    project_id: int | None
    to_file: str | None
    pairs_version: int
    attributes_version: int | None
    selected: int
    imported: int
    already_imported: int
    with_attributes: int
    orders: dict[str, int]
    loop: str | None = None
    iteration: int | None = None

    def tables_read(self) -> list[TableVersion]:
        return super().tables_read() + versions((ATTRIBUTES, self.attributes_version))

    def metrics(self) -> dict[str, float]:
        counts = {"selected": self.selected, "imported": self.imported}
        counts |= {"already_imported": self.already_imported}
        counts |= {"with_attributes": self.with_attributes}
        return counts | {f"order.{order}": n for order, n in self.orders.items()}

    def text(self) -> str:
        where = (
            f"written to {self.to_file} (Label Studio JSON import)"
            if self.to_file
            else f"imported into Label Studio project {self.project!r} (id {self.project_id})"
        )
        orders = ", ".join(f"{order} {n:,}" for order, n in sorted(self.orders.items()))
        return (
            f"review push: {self.selected:,} pairs selected, {self.imported:,} tasks {where}, "
            f"{self.already_imported:,} already there; shown orders {orders or 'none'}, "
            f"{self.with_attributes:,} with attributes"
        )


def push_pairs(
    lake: Lake,
    review: ReviewConfig,
    keys: pa.Table,
    run_id: str | None,
    loop: str | None = None,
    iteration: int | None = None,
    to_file: Path | None = None,
) -> ReviewPushSummary:
    """Send the pairs ``keys`` (source, pair_id) to review: as tasks of the project titled
    ``review.project`` (created on first use; pairs already there are skipped), or, with
    ``to_file``, as Label Studio's JSON import file for annotators without our server."""
    pairs_version = lake.version(PAIRS.name)
    columns = ["source", "pair_id", "history", "chosen", "rejected"]
    pairs = _of_keys(lake, PAIRS.name, pairs_version, keys, columns)
    pairs = pairs.sort_by([("pair_id", "ascending"), ("source", "ascending")])
    if pairs.num_rows != keys.num_rows:
        raise SelectionError(
            f"{keys.num_rows - pairs.num_rows} of the {keys.num_rows} pairs to review are not "
            f"in pairs@{pairs_version}"
        )
    attributes_version = lake.version(ATTRIBUTES.name) if lake.exists(ATTRIBUTES.name) else None
    attributes = _latest_attributes(lake, attributes_version, keys)
    tasks = [
        {"data": task_data(pair, attributes.get(_key(pair)), review.seed, run_id, loop, iteration)}
        for pair in pairs.to_pylist()
    ]
    project_id = None
    if to_file is not None:
        to_file.write_text(json.dumps(tasks, ensure_ascii=False, indent=1))
        new = tasks
    else:
        with LabelStudio(review) as studio:
            project_id = studio.find_project(review.project)
            project_id = project_id or studio.create_project(review.project)
            present = {_key(task["data"]) for task in studio.tasks(project_id)}
            new = [task for task in tasks if _key(task["data"]) not in present]
            studio.import_tasks(project_id, new)
    log.info(f"[review] {len(new):,} of {len(tasks):,} pairs sent to review")
    return ReviewPushSummary(
        project=None if to_file else review.project,
        project_id=project_id,
        to_file=str(to_file) if to_file else None,
        pairs_version=pairs_version,
        attributes_version=attributes_version,
        selected=len(tasks),
        imported=len(new),
        already_imported=len(tasks) - len(new),
        with_attributes=sum(_key(task["data"]) in attributes for task in new),
        orders=dict(Counter(t["data"]["order"] for t in new)),
        loop=loop,
        iteration=iteration,
    )


def _key(row: dict[str, Any]) -> tuple[Any, Any]:
    return row.get("source"), row.get("pair_id")


def open_tasks(review: ReviewConfig, loop: str | None = None, iteration: int | None = None) -> int:
    """Tasks of the project (of that loop and iteration, when given) that nobody has answered
    or skipped yet: the loop waits until this is 0."""
    with LabelStudio(review) as studio:
        project = studio.find_project(review.project)
        if project is None:
            return 0
        return sum(
            1
            for task in studio.tasks(project)
            if (loop is None or task["data"].get("loop") == loop)
            and (iteration is None or task["data"].get("iteration") == iteration)
            and task["total_annotations"] + task["cancelled_annotations"] == 0
        )


def _of_keys(
    lake: Lake,
    table: str,
    version: int,
    keys: pa.Table,
    columns: list[str],
    where: str | None = None,
) -> pa.Table:
    """The rows of ``table`` at ``version`` (matching ``where``) of the pairs in ``keys``."""
    ids = ", ".join(literal(p) for p in sorted(set(keys["pair_id"].to_pylist())))
    rows = lake.read(
        table, version, columns, all_of(f"pair_id IN ({ids})" if ids else "FALSE", where)
    )
    return rows.filter(pc.is_in(pair_keys(rows), value_set=pair_keys(keys).combine_chunks()))


def _latest_attributes(
    lake: Lake, version: int | None, keys: pa.Table
) -> dict[tuple[str, str], dict[str, Any]]:
    """Each pair's latest valid attributes (of any annotator)."""
    if version is None:
        return {}
    columns = ["source", "pair_id", "annotated_at", *ATTRIBUTE_FIELDS]
    rows = _of_keys(lake, ATTRIBUTES.name, version, keys, columns, "valid")
    latest = {}
    for row in sorted(rows.to_pylist(), key=lambda r: r["annotated_at"]):
        latest[(row["source"], row["pair_id"])] = row
    return latest


# ------------------------------------------------------------------------------ pull


@dataclass(frozen=True)
class Answer:
    """One annotation of one task, as Label Studio exports it."""

    source: str
    pair_id: str
    order: str
    project: str
    task: int | None
    annotation: int
    version: str | None
    who: str
    choice: str | None
    cancelled: bool
    lead_time_s: float | None
    loop: str | None
    iteration: int | None

    @property
    def label(self) -> str | None:
        """keep, flip or unsure; ``None`` when skipped or not one of the choices."""
        return None if self.cancelled else label_of(self.choice, self.order)

    def event(self, pairs_version: int) -> LabelEvent:
        """The human label event of this answer. An annotation edited in Label Studio is a
        new decision (its ``updated_at`` is part of the key); the same one is the same event."""
        decision = f"labelstudio:{self.project}:{self.annotation}"
        return LabelEvent(
            self.source,
            self.pair_id,
            self.label,
            "human",
            self.who,
            decision + (f"@{self.version}" if self.version else ""),
            loop=self.loop,
            iteration=self.iteration,
            step="review",
            evidence={
                "annotation": self.annotation,
                "task": self.task,
                "project": self.project,
                "lead_time_s": self.lead_time_s,
                "order": self.order,
                "choice": self.choice,
            },
            read_versions={PAIRS.name: pairs_version},
        )


def read_answers(tasks: Any, origin: str) -> list[Answer]:
    """Every annotation of Label Studio's JSON export (a list of tasks, each with ``data`` and
    ``annotations``) of tasks that ``push_pairs`` made; anything else is a ``FormatError``
    that names ``origin`` and the task."""
    if not isinstance(tasks, list):
        raise FormatError(
            f"{origin} is not a Label Studio JSON export: expected a list of tasks, "
            f"found a {type(tasks).__name__}"
        )
    answers = []
    for index, task in enumerate(tasks):
        where = f"{origin}, task {index}"
        if not (
            isinstance(task, dict)
            and isinstance(task.get("data"), dict)
            and isinstance(task.get("annotations", []), list)
        ):
            raise FormatError(
                f"{where}: not a Label Studio task (an object with data and annotations)"
            )
        data = task["data"]
        missing = [k for k in ("source", "pair_id", "order") if not isinstance(data.get(k), str)]
        if missing or data["order"] not in JUDGE_ORDERS:
            raise FormatError(
                f"{where}: data has no valid {', '.join(missing) or 'order'}: not a task made "
                "by `synpref review push`"
            )
        answers += [_answer(task, annotation, where) for annotation in task.get("annotations", [])]
    return answers


def _answer(task: dict[str, Any], annotation: Any, where: str) -> Answer:
    if not isinstance(annotation, dict) or not isinstance(annotation.get("id"), int):
        raise FormatError(f"{where}: an annotation without an id")
    user = annotation.get("completed_by")
    email = user.get("email") if isinstance(user, dict) else None
    user_id = user.get("id") if isinstance(user, dict) else user
    if email is None and user_id is None:
        raise FormatError(f"{where}, annotation {annotation['id']}: no completed_by")
    choices = [
        r.get("value", {}).get("choices", [])
        for r in annotation.get("result") or []
        if isinstance(r, dict) and r.get("from_name") == CHOICE_NAME and r.get("type") == "choices"
    ]
    data = task["data"]
    return Answer(
        source=data["source"],
        pair_id=data["pair_id"],
        order=data["order"],
        project=str(annotation.get("project") or task.get("project") or "export"),
        task=task.get("id"),
        annotation=annotation["id"],
        version=annotation.get("updated_at"),
        who=f"labelstudio:{email}" if email else f"labelstudio:user:{user_id}",
        choice=" | ".join(c for found in choices for c in found) or None,
        cancelled=bool(annotation.get("was_cancelled")),
        lead_time_s=annotation.get("lead_time"),
        loop=data.get("loop"),
        iteration=data.get("iteration"),
    )


def read_export(path: Path) -> list[Answer]:
    """The answers of a Label Studio JSON export file (a vendor's, or one saved from the UI)."""
    try:
        tasks = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path} is not a Label Studio JSON export: {exc}") from None
    return read_answers(tasks, str(path))


@dataclass
class ReviewPullSummary(PairsSummary):
    job: ClassVar[str] = "review_pull"
    origin: str
    pairs_version: int
    tasks: int
    annotations: int
    labels: dict[str, int]
    events_new: int
    events_known: int
    skipped: int
    unknown_choices: list[dict[str, Any]]
    unknown_pairs: int
    label_events_version: int | None
    labels_version: int | None
    verdicts_version: int | None
    decided_pairs: int
    """Pairs the reviewers decided (keep or flip: each annotator's latest answer, majority)."""
    original_kept: float | None
    """Share of the decided pairs whose original label the reviewers kept."""
    judges: dict[str, Agreement]
    """By judge panel: the reviewers against its latest verdict (agree ~ keep, disagree ~ flip)
    on the pairs both decided."""
    annotators: Agreement
    """Between annotators, on the pairs several of them labelled (keep, flip or unsure)."""

    def tables_read(self) -> list[TableVersion]:
        return super().tables_read() + versions((VERDICTS, self.verdicts_version))

    def tables_written(self) -> list[TableVersion]:
        return versions((LABEL_EVENTS, self.label_events_version), (LABELS, self.labels_version))

    def metrics(self) -> dict[str, float]:
        metrics: dict[str, float] = {
            "tasks": self.tasks,
            "annotations": self.annotations,
            "events_new": self.events_new,
            "events_known": self.events_known,
            "skipped": self.skipped,
            "unknown_choices": len(self.unknown_choices),
            "unknown_pairs": self.unknown_pairs,
            "decided_pairs": self.decided_pairs,
        }
        metrics |= {f"labels.{label}": n for label, n in self.labels.items()}
        if self.original_kept is not None:
            metrics["original_kept"] = self.original_kept
        named = {f"judges.{name}": agreement for name, agreement in self.judges.items()}
        for name, agreement in (named | {"annotators": self.annotators}).items():
            metrics[f"{name}.items"] = agreement.items
            for measure in ("raw", "kappa"):
                if (value := getattr(agreement, measure)) is not None:
                    metrics[f"{name}.{measure}"] = value
        return metrics

    def text(self) -> str:
        labels = ", ".join(f"{label} {n:,}" for label, n in sorted(self.labels.items()))
        kept = "-" if self.original_kept is None else f"{100 * self.original_kept:.1f}%"
        lines = [
            f"review pull from {self.origin}: {self.annotations:,} annotations of "
            f"{self.tasks:,} tasks -> labels {labels or 'none'}; {self.events_new:,} new label "
            f"events ({self.events_known:,} already recorded), {self.skipped:,} skipped",
            f"  original label kept in {kept} of {self.decided_pairs:,} decided pairs",
        ]
        lines += [f"  judges {name}: {_agreement(a)}" for name, a in sorted(self.judges.items())]
        lines.append(f"  between annotators: {_agreement(self.annotators)}")
        lines += [
            f"  unknown choice {u['choice']!r}: task {u['task']}, annotation {u['annotation']} "
            f"by {u['who']} (not a label)"
            for u in self.unknown_choices
        ]
        if self.unknown_pairs:
            lines.append(f"  {self.unknown_pairs:,} answers about pairs not in the lake (ignored)")
        return "\n".join(lines)


def _agreement(agreement: Agreement) -> str:
    if agreement.raw is None:
        return "no pairs decided by both"
    kappa = "undefined" if agreement.kappa is None else f"{agreement.kappa:.2f}"
    share = f"{100 * agreement.raw:.1f}% agree on {agreement.items:,}"
    return f"{share}, {agreement.method} kappa {kappa}"


def pull_annotations(
    lake: Lake, config: SynprefConfig, run_id: str, from_file: Path | None = None
) -> ReviewPullSummary:
    """Record the answers of the review project (or of a Label Studio JSON export file) as
    human label events, rebuild ``labels``, and measure agreement."""
    answers, origin = _fetch(config.review, from_file)
    pairs_version = lake.version(PAIRS.name)
    keys = pa.Table.from_pylist(
        [{"source": a.source, "pair_id": a.pair_id} for a in answers],
        pa.schema([("source", pa.string()), ("pair_id", pa.string())]),
    )
    present = _of_keys(lake, PAIRS.name, pairs_version, keys, ["source", "pair_id"])
    known = set(zip(present["source"].to_pylist(), present["pair_id"].to_pylist(), strict=True))
    labelled = [a for a in answers if a.label is not None and (a.source, a.pair_id) in known]
    events = [a.event(pairs_version) for a in labelled]
    written = record_events(lake, events, run_id)
    rebuilt = rebuild_labels(lake, config.loop.human_sources)
    unknown = [a for a in answers if not a.cancelled and a.label is None]
    for a in unknown:
        log.warning(
            f"[review] task {a.task}, annotation {a.annotation} by {a.who}: unknown choice "
            f"{a.choice!r}, not a label"
        )
    verdicts_version = lake.version(VERDICTS.name) if lake.exists(VERDICTS.name) else None
    human = derive_labels(event_rows(events, run_id), config.loop.human_sources)
    decided = [label for label in human["label"].to_pylist() if label in PANEL_LABELS.values()]
    log.info(f"[review] {written.rows_inserted:,} new human label events from {origin}")
    return ReviewPullSummary(
        origin=origin,
        pairs_version=pairs_version,
        tasks=len({(a.project, a.task, a.source, a.pair_id) for a in answers}),
        annotations=len(answers),
        labels=dict(Counter(a.label for a in labelled)),
        events_new=written.rows_inserted,
        events_known=len(events) - written.rows_inserted,
        skipped=sum(a.cancelled for a in answers),
        unknown_choices=[
            {"task": a.task, "annotation": a.annotation, "who": a.who, "choice": a.choice}
            for a in unknown
        ],
        unknown_pairs=sum((a.source, a.pair_id) not in known for a in answers),
        label_events_version=written.version if written.rows_inserted else None,
        labels_version=rebuilt.version if _changed(rebuilt) else None,
        verdicts_version=verdicts_version,
        decided_pairs=len(decided),
        original_kept=decided.count("keep") / len(decided) if decided else None,
        judges=_with_judges(lake, verdicts_version, human),
        annotators=among_raters(_by_annotator(labelled), HUMAN_LABELS),
    )


def _fetch(review: ReviewConfig, from_file: Path | None) -> tuple[list[Answer], str]:
    """The answers, and where they come from: the file, or the review project's export."""
    if from_file is not None:
        return read_export(from_file), str(from_file)
    with LabelStudio(review) as studio:
        project = studio.find_project(review.project)
        if project is None:
            raise ReviewError(
                f"Label Studio at {studio.url} has no project {review.project!r} "
                "(config review.project): push pairs first (`synpref review push`)"
            )
        origin = f"Label Studio project {review.project!r} (id {project}) at {studio.url}"
        return read_answers(studio.export(project), origin), origin


def _changed(result: WriteResult) -> bool:
    return bool(result.rows_inserted or result.rows_updated or result.rows_deleted)


def _with_judges(lake: Lake, version: int | None, human: pa.Table) -> dict[str, Agreement]:
    """Agreement of the people's label of each pair with each judge panel's latest verdict,
    over the pairs both decided (keep or flip)."""
    if version is None or human.num_rows == 0:
        return {}
    columns = ["source", "pair_id", "judge", "verdict", "decided_at"]
    rows = _of_keys(lake, VERDICTS.name, version, human, columns, "level = 'panel'").to_pylist()
    latest: dict[str, dict[tuple[str, str], str]] = {}
    for row in sorted(rows, key=lambda r: r["decided_at"]):
        latest.setdefault(row["judge"], {})[(row["source"], row["pair_id"])] = row["verdict"]
    people = {
        (row["source"], row["pair_id"]): row["label"]
        for row in human.to_pylist()
        if row["label"] in PANEL_LABELS.values()
    }
    agreements = {}
    for judge, verdicts in latest.items():
        both = [
            (people[key], PANEL_LABELS[verdict])
            for key, verdict in verdicts.items()
            if key in people and verdict in PANEL_LABELS
        ]
        agreements[judge] = cohen([p for p, _ in both], [j for _, j in both], ("keep", "flip"))
    return agreements


def _by_annotator(answers: list[Answer]) -> dict[tuple[str, str], dict[str, str]]:
    """Each pair's latest label by each annotator."""
    labels: dict[tuple[str, str], dict[str, str]] = {}
    for answer in sorted(answers, key=lambda a: (a.version or "", a.annotation)):
        if answer.label is not None:
            labels.setdefault((answer.source, answer.pair_id), {})[answer.who] = answer.label
    return labels
