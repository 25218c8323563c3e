"""Human review in a real Label Studio: real HH pairs pushed as tasks, two annotators answering
through the REST API as their clients do, the answers pulled into label_events with agreement
numbers checked by hand; the file route for vendors; clear errors for bad setups and files."""

import contextlib
import gzip
import http.server
import json
import re
import shutil
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import mlflow
import pyarrow as pa
import pytest

from pipelines import jobs
from pipelines.core.config import ReviewConfig
from pipelines.core.errors import FormatError, SelectionError
from pipelines.core.lake import Lake
from pipelines.core.selection import select_pair_keys
from pipelines.ingest.job import IngestRequest
from pipelines.labels import review
from pipelines.labels.agreement import fleiss
from pipelines.labels.review import (
    LabelStudio,
    ReviewError,
    open_tasks,
    pull_annotations,
    push_pairs,
    shown_order,
)
from storage_schemas import ATTRIBUTES, PAIRS, VERDICTS
from tests.conftest import HH_HARMLESS, free_port, pairs_rows, shared_data
from tests.labelstudio import answer, sign_up

SECOND = "second@example.com"

# The eight pushed pairs (by pair_id) as each annotator labels them: None skips the task, any
# other string is clicked as a choice the project does not offer.
FIRST_LABELS = ["keep", "keep", "flip", "flip", "unsure", "keep", "keep", "flip"]
SECOND_LABELS = ["keep", "flip", "flip", "flip", "unsure", "keep", None, "Both are bad"]
# Per pair: each annotator's latest answer, majority, a tie is unsure.
PAIR_LABELS = ["keep", "unsure", "flip", "flip", "unsure", "keep", "keep", "flip"]
PANEL = ["agree", "disagree", "disagree", "agree", "agree", "tie", "agree", "disagree"]


def choice_for(label: str, order: str) -> str:
    """What a person clicks to give ``label`` to a pair whose chosen response is shown first
    (order AB) or second (BA)."""
    if label not in ("keep", "flip", "unsure"):
        return label
    if label == "unsure":
        return "Can't decide"
    chosen_first = order == "AB"
    return "Response 1 is better" if (label == "keep") == chosen_first else "Response 2 is better"


@pytest.fixture
def hh(config, tmp_path, ray_cluster):
    """30 real HH records ingested; valid attributes for the first two pairs (an invalid row
    for the third) and a judge panel's verdicts on the first eight."""
    with gzip.open(shared_data(HH_HARMLESS), "rt") as file:
        lines = [next(file) for _ in range(30)]
    sample = tmp_path / "hh-sample.jsonl"
    sample.write_text("".join(lines))
    jobs.ingest(config, IngestRequest(paths=[str(sample)], source="hh"))
    lake = Lake(config.lake.root)
    keys = select_pair_keys(lake, lake.version("pairs")).to_pylist()
    now = datetime.now(UTC)
    attributes = [
        {
            **key,
            "annotator_key": "test",
            "model": "hand",
            "template": "v1",
            "template_hash": "h",
            "valid": valid,
            "invalid_reason": None if valid else "not json",
            "task_category": "Advice seeking" if valid else None,
            "objectivity": "subjective" if valid else None,
            "controversiality": "high" if valid else None,
            "desired_attributes": ["harmless", "honest"] if valid else None,
            "guideline": f"Prefer the safer answer ({i})." if valid else None,
            "output": "{}",
            "attempts": 1,
            "prompt_tokens": 1,
            "output_tokens": 1,
            "annotate_run_id": "r",
            "annotated_at": now,
        }
        for i, (key, valid) in enumerate(zip(keys, [True, True, False], strict=False))
    ]
    lake.insert_new(ATTRIBUTES, pa.Table.from_pylist(attributes, ATTRIBUTES.schema))
    verdicts = [
        {
            **key,
            "judge_key": "panel-key",
            "level": "panel",
            "judge": "panel:majority",
            "verdict": verdict,
            "confidence": 1.0,
            "p_chosen": None,
            "votes": 2,
            "invalid": 0,
            "detail": "",
            "verdict_run_id": "r",
            "decided_at": now,
        }
        for key, verdict in zip(keys, PANEL, strict=False)
    ]
    lake.insert_new(VERDICTS, pa.Table.from_pylist(verdicts, VERDICTS.schema))
    return keys


@pytest.fixture
def review_config(config, label_studio, monkeypatch, request):
    """The test config pointed at the session's Label Studio, one project per test."""
    monkeypatch.setenv(config.review.token_env, label_studio.token)
    review = ReviewConfig(url=label_studio.url, project=request.node.name[:50])  # LS: <= 50
    return config.model_copy(update={"review": review})


def server_tasks(server, project: int) -> dict[str, dict]:
    """The project's tasks by pair_id, read as the admin."""
    response = httpx.get(
        f"{server.url}/api/tasks",
        params={"project": project, "page_size": 100},
        headers={"Authorization": f"Token {server.token}"},
    )
    return {t["data"]["pair_id"]: t for t in response.raise_for_status().json()["tasks"]}


def test_push_annotate_pull_with_two_annotators_and_the_vendor_file_route(
    label_studio, hh, review_config, lake, run, tmp_path, monkeypatch
):
    config = review_config
    monkeypatch.setattr(review, "BATCH", 3)  # imports and task lists take several requests
    vendor_lake = tmp_path / "vendor-lake"
    shutil.copytree(config.lake.root, vendor_lake)  # the same pairs, for the file route
    pairs = {p["pair_id"]: p for p in lake.read("pairs").to_pylist()}
    ids = [k["pair_id"] for k in hh]

    # Push: eight tasks, in a seeded order each, attributes where the lake has valid ones.
    pushed = jobs.review_push(config, limit=8).summary
    assert (pushed.selected, pushed.imported, pushed.already_imported) == (8, 8, 0)
    assert pushed.with_attributes == 2 and sum(pushed.orders.values()) == 8
    tasks = server_tasks(label_studio, pushed.project_id)
    assert sorted(tasks) == ids[:8]
    for pair_id, task in tasks.items():
        data, pair = task["data"], pairs[pair_id]
        assert data["order"] == shown_order(config.review.seed, "hh", pair_id)
        first, second = (pair["chosen"], pair["rejected"])[:: 1 if data["order"] == "AB" else -1]
        assert (data["response_1"], data["response_2"]) == (first, second)
        assert data["history"] == pair["history"] and "loop" not in data
    assert tasks[ids[0]]["data"]["guideline"] == "Prefer the safer answer (0)."
    assert tasks[ids[2]]["data"]["attributes"] == "(no attributes)"  # its row is invalid
    assert set(pushed.orders) == {"AB", "BA"}

    again = jobs.review_push(config, limit=8).summary
    assert (again.imported, again.already_imported) == (0, 8)
    assert len(server_tasks(label_studio, pushed.project_id)) == 8

    # Two more pairs for a loop's first iteration, as the loop pushes them.
    loop_keys = pa.Table.from_pylist(hh[8:10])
    push_pairs(lake, config.review, loop_keys, "loop-run", loop="L", iteration=1)
    assert open_tasks(config.review) == 10
    assert (open_tasks(config.review, "L", 1), open_tasks(config.review, "L", 2)) == (2, 0)

    # Two people answer, as their Label Studio clients do.
    tasks = server_tasks(label_studio, pushed.project_id)
    second_token = sign_up(label_studio, SECOND, "second-password")
    first_answers = {}
    for pair_id, label in zip(ids[:9], [*FIRST_LABELS, "keep"], strict=True):
        task = tasks[pair_id]
        first_answers[pair_id] = answer(
            label_studio, label_studio.token, task["id"], choice_for(label, task["data"]["order"])
        )
    for pair_id, label in zip(ids[:8], SECOND_LABELS, strict=True):
        task = tasks[pair_id]
        choice = None if label is None else choice_for(label, task["data"]["order"])
        answer(label_studio, second_token, task["id"], choice, lead_time=2.5)
    assert open_tasks(config.review) == 1 and open_tasks(config.review, "L", 1) == 1

    # Pull: every answer a human label event, the shown order mapped back.
    pulled = jobs.review_pull(config)
    summary = pulled.summary
    assert (summary.annotations, summary.tasks, summary.skipped) == (17, 9, 1)
    assert summary.labels == {"keep": 7, "flip": 6, "unsure": 2}
    assert (summary.events_new, summary.events_known, summary.unknown_pairs) == (15, 0, 0)
    unknown_task = tasks[ids[7]]["id"]
    assert [(u["task"], u["who"], u["choice"]) for u in summary.unknown_choices] == [
        (unknown_task, f"labelstudio:{SECOND}", "Both are bad")
    ]
    assert "unknown choice 'Both are bad'" in summary.text()

    events = lake.read("label_events").to_pylist()
    admin_who, second_who = f"labelstudio:{label_studio.email}", f"labelstudio:{SECOND}"
    expected = {(ids[i], admin_who): label for i, label in enumerate([*FIRST_LABELS, "keep"])}
    expected |= {
        (ids[i], second_who): label
        for i, label in enumerate(SECOND_LABELS)
        if label in ("keep", "flip", "unsure")
    }
    assert {(e["pair_id"], e["who"]): e["label"] for e in events} == expected
    assert {(e["origin"], e["step"]) for e in events} == {("human", "review")}
    for event in events:
        evidence = json.loads(event["evidence"])
        assert evidence["order"] == shown_order(config.review.seed, "hh", event["pair_id"])
        assert evidence["project"] == str(pushed.project_id)
        assert json.loads(event["read_versions"]) == {"pairs": lake.version("pairs")}
        in_loop = event["pair_id"] == ids[8]
        assert (event["loop"], event["iteration"]) == (("L", 1) if in_loop else (None, None))
    first_event = next(e for e in events if e["pair_id"] == ids[0] and e["who"] == admin_who)
    evidence = json.loads(first_event["evidence"])
    assert evidence["annotation"] == first_answers[ids[0]]["id"]
    assert evidence["lead_time_s"] == 5.0

    labels = {r["pair_id"]: (r["label"], r["pool"]) for r in lake.read("labels").to_pylist()}
    assert {p: label for p, (label, _) in labels.items()} == dict(
        zip(ids[:9], [*PAIR_LABELS, "keep"], strict=True)
    )
    assert labels[ids[0]][1] == "D_gold" and labels[ids[4]][1] == "D_wild"

    # Agreement, by hand. With the original labels: 4 keeps among 7 decided pairs.
    assert (summary.decided_pairs, summary.original_kept) == (7, 4 / 7)
    # With the panel, over the 5 pairs both decided: people k f f k f, judges k f k k f:
    # p_o = 4/5, p_e = (2*3 + 3*2)/25 = 12/25, kappa = (4/5 - 12/25) / (1 - 12/25) = 8/13.
    panel = summary.judges["panel:majority"]
    assert (panel.items, panel.raw) == (5, 0.8) and panel.kappa == pytest.approx(8 / 13)
    # Between the two people, over the 6 pairs both labelled: first k k f f u k, second
    # k f f f u k: p_o = 5/6, p_e = (3*2 + 2*3 + 1*1)/36 = 13/36, kappa = 17/23.
    people = summary.annotators
    assert (people.method, people.items) == ("cohen", 6)
    assert people.raw == pytest.approx(5 / 6) and people.kappa == pytest.approx(17 / 23)
    mlflow.set_tracking_uri(config.tracking.uri)
    metrics = mlflow.get_run(pulled.run_id).data.metrics
    assert metrics["annotators.kappa"] == pytest.approx(17 / 23)
    assert metrics["unknown_choices"] == 1 and metrics["skipped"] == 1

    # Re-pulling adds nothing.
    version = lake.version("label_events")
    repeat = jobs.review_pull(config).summary
    assert (repeat.events_new, repeat.events_known) == (0, 15)
    assert repeat.label_events_version is None and repeat.labels_version is None
    assert lake.version("label_events") == version

    # The vendor route: the same tasks as an import file, answered in the export format, give
    # the same labels as the server did.
    import_file, export_file = tmp_path / "tasks.json", tmp_path / "export.json"
    vendor = ["--lake", str(vendor_lake), "--json"]
    written = json.loads(
        run("review", "push", *vendor, "--limit", "8", "--to-file", str(import_file)).stdout
    )
    assert written["imported"] == 8 and written["project_id"] is None
    file_tasks = json.loads(import_file.read_text())
    for task in file_tasks:
        on_server = dict(tasks[task["data"]["pair_id"]]["data"])
        assert task["data"] | {"push_run_id": None} == on_server | {"push_run_id": None}
    export, annotation_id = [], 500
    for index, task in enumerate(file_tasks):
        annotations = []
        position = ids.index(task["data"]["pair_id"])
        for user_id, email, label in (
            (1, label_studio.email, FIRST_LABELS[position]),
            (2, SECOND, SECOND_LABELS[position]),
        ):
            annotation_id += 1
            choice = None if label is None else choice_for(label, task["data"]["order"])
            value = {"choices": [choice]}
            annotations.append(
                {
                    "id": annotation_id,
                    "completed_by": {"id": user_id, "email": email},
                    "result": []
                    if choice is None
                    else [
                        {
                            "from_name": "preference",
                            "to_name": "response_1",
                            "type": "choices",
                            "value": value,
                        }
                    ],
                    "was_cancelled": choice is None,
                    "lead_time": 4.0,
                    "updated_at": "2026-01-01T00:00:00Z",
                    "task": 900 + index,
                    "project": 77,
                }
            )
        export.append(
            {"id": 900 + index, "project": 77, "data": task["data"], "annotations": annotations}
        )
    export_file.write_text(json.dumps(export))
    from_file = json.loads(run("review", "pull", *vendor, "--from-file", str(export_file)).stdout)
    assert (from_file["events_new"], from_file["skipped"]) == (14, 1)
    assert len(from_file["unknown_choices"]) == 1
    vendor_events = Lake(str(vendor_lake)).read("label_events").to_pylist()
    assert {(e["pair_id"], e["who"]): e["label"] for e in vendor_events} == {
        key: label for key, label in expected.items() if key[0] != ids[8]
    }
    vendor_labels = Lake(str(vendor_lake)).read("labels").to_pylist()
    assert {r["pair_id"]: (r["label"], r["pool"]) for r in vendor_labels} == {
        p: v for p, v in labels.items() if p != ids[8]
    }
    assert from_file["annotators"]["kappa"] == pytest.approx(17 / 23)

    # An answer edited in Label Studio is a new decision: the pair's label follows it.
    edited = first_answers[ids[1]]["id"]
    flip = choice_for("flip", tasks[ids[1]]["data"]["order"])
    httpx.patch(
        f"{label_studio.url}/api/annotations/{edited}/",
        json={
            "result": [
                {
                    "from_name": "preference",
                    "to_name": "response_1",
                    "type": "choices",
                    "value": {"choices": [flip]},
                }
            ]
        },
        headers={"Authorization": f"Token {label_studio.token}"},
    ).raise_for_status()
    assert jobs.review_pull(config).summary.events_new == 1
    assert lake.read("labels", where=f"pair_id = '{ids[1]}'")["label"].to_pylist() == ["flip"]


def test_server_problems_are_review_errors_that_say_what_to_check(
    label_studio, config, run, monkeypatch
):
    review = ReviewConfig(url=label_studio.url, project="synpref errors")
    monkeypatch.delenv(review.token_env, raising=False)
    with pytest.raises(ReviewError, match=re.escape(f"${review.token_env}")):
        open_tasks(review)
    monkeypatch.setenv(review.token_env, "not-the-token")
    with pytest.raises(ReviewError, match="refused the token"):
        open_tasks(review)

    monkeypatch.setenv(review.token_env, label_studio.token)
    assert open_tasks(review) == 0  # nothing pushed yet
    with pytest.raises(ReviewError, match="no project 'synpref errors'.*review push"):
        pull_annotations(
            Lake(config.lake.root), config.model_copy(update={"review": review}), "run"
        )

    with (
        LabelStudio(review) as server,
        pytest.raises(ReviewError, match="GET /api/projects/987654/export failed with 404"),
    ):
        server.call("GET", "/api/projects/987654/export")
    with (
        _html_server() as not_label_studio,
        pytest.raises(ReviewError, match="with text/html, not Label Studio's JSON: is review.url"),
    ):
        open_tasks(ReviewConfig(url=not_label_studio))

    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ReviewError, match=re.escape(f"Label Studio at {down} did not answer")):
        open_tasks(ReviewConfig(url=down, timeout_s=5))
    monkeypatch.setenv("SYNPREF_REVIEW__URL", down)
    result = run("review", "pull", expect=1)
    assert f"Label Studio at {down} did not answer" in result.output
    assert "Traceback" not in result.output


@contextlib.contextmanager
def _html_server() -> Iterator[str]:
    """A web server on the loopback that answers every GET with a 200 HTML page (a login page,
    another app), as a wrong review.url would."""

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<html><body>Sign in</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()


def test_a_file_that_is_not_a_label_studio_export_is_named(config, lake, tmp_path):
    task = '[{"data": {"source": "hh", "pair_id": "p", "order": "AB"}, "annotations": [%s]}]'
    cases = {  # name: (file text, what the error says after the file's name)
        "not-json": ("{", "is not a Label Studio JSON export: "),
        "an-object": ('{"tasks": []}', "expected a list of tasks, found a dict"),
        "strings": ('["a task"]', "task 0: not a Label Studio task"),
        "foreign-task": (
            '[{"id": 1, "data": {"text": "hi"}, "annotations": []}]',
            "task 0: data has no valid source, pair_id, order",
        ),
        "bad-order": (
            '[{"data": {"source": "hh", "pair_id": "p", "order": "AC"}}]',
            "task 0: data has no valid order",
        ),
        "no-annotation-id": (task % '{"result": []}', "task 0: an annotation without an id"),
        "no-annotator": (task % '{"id": 7, "result": []}', "task 0, annotation 7: no completed_by"),
    }
    for name, (text, says) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(text)
        with pytest.raises(FormatError, match=re.escape(str(path)) + ".*" + re.escape(says)):
            pull_annotations(lake, config, "run", from_file=path)


def test_pairs_to_review_that_are_not_in_the_lake_are_refused(config, lake, tmp_path):
    lake.insert_new(PAIRS, pairs_rows(range(2)))
    keys = pa.table({"source": ["s", "s"], "pair_id": [f"{0:032x}", "gone"]})
    version = lake.version("pairs")
    with pytest.raises(
        SelectionError, match=f"1 of the 2 pairs to review are not in pairs@{version}"
    ):
        push_pairs(lake, config.review, keys, "run", to_file=tmp_path / "tasks.json")
    assert not (tmp_path / "tasks.json").exists()


def test_the_shown_order_is_a_fixed_coin_flip_per_pair_and_seed():
    ids = [f"{i:032x}" for i in range(200)]
    orders = [shown_order(0, "hh", p) for p in ids]
    assert orders == [shown_order(0, "hh", p) for p in ids]
    assert 70 < orders.count("AB") < 130
    assert orders != [shown_order(1, "hh", p) for p in ids]


def test_fleiss_kappa_by_hand():
    # Three raters, four items. P_i: 1, 1/3, 1, 0 -> P = 7/12; category shares 6/12, 5/12,
    # 1/12 -> P_e = 62/144; kappa = (7/12 - 62/144) / (1 - 62/144) = 11/41.
    ratings = [
        ["keep", "keep", "keep"],
        ["keep", "keep", "flip"],
        ["flip", "flip", "flip"],
        ["keep", "flip", "unsure"],
    ]
    agreement = fleiss(ratings, ("keep", "flip", "unsure"))
    assert agreement.items == 4 and agreement.raw == pytest.approx(7 / 12)
    assert agreement.kappa == pytest.approx(11 / 41)
    assert fleiss([["keep", "keep"]], ("keep", "flip")).kappa is None  # one category: undefined
