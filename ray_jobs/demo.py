"""`synpref demo`: the platform's main job on the embedded defaults.

Today it generates a seeded synthetic corpus (with planted duplicates, flips, contamination and
bad rows), ingests it and the real datasets found beside the checkout (HH-RLHF, RM-Bench,
JudgeBench), runs the hygiene step (dedup, label conflicts, near-duplicates, decontamination
against the benchmarks), and prints the lake's tables and where to look next. It grows into the full
curation loop as capabilities land; every step is a child run of one MLflow parent run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from pipelines.core.config import SynprefConfig
from pipelines.core.lake import Lake
from pipelines.core.ray_cluster import connect
from pipelines.core.tracking import job_run, run_location
from pipelines.ingest.job import IngestRequest
from pipelines.ingest.synthetic import CorpusSpec, benchmark_prompts, write_corpus
from ray_jobs.decontaminate import run_decontaminate
from ray_jobs.dedup import run_dedup
from ray_jobs.ingest import run_ingest
from ray_jobs.job import emit, global_options, json_option, progress, resolve_config

DEMO_SOURCE = "synthetic-demo"


def run_demo(config: SynprefConfig) -> dict[str, Any]:
    dashboard = connect(config.ray)
    demo = config.demo
    ingests: list[dict[str, Any]] = []
    skipped: list[str] = []
    with job_run(config, "demo") as parent:
        extra = {
            name: [p for p in paths if Path(p).exists()]
            for name, paths in demo.extra_inputs.items()
        }
        skipped = [p for paths in demo.extra_inputs.values() for p in paths if not Path(p).exists()]
        prompts = _first_benchmark_prompts(extra.get("rm-bench", []))
        spec = CorpusSpec(
            pairs=demo.pairs, seed=demo.seed, contamination_rate=0.01 if prompts else 0
        )
        files = write_corpus(spec, Path(demo.workdir), benchmark_prompts=prompts)
        progress(
            f"[demo] generated {demo.pairs:,} synthetic pairs (+ planted rows) in {demo.workdir}"
        )
        sources = {DEMO_SOURCE: [str(f) for f in files]} | {n: p for n, p in extra.items() if p}
        for source, paths in sources.items():
            ingests.append(run_ingest(config, IngestRequest(paths=paths, source=source)))
        hygiene = [run_dedup(config), run_decontaminate(config)]
        location = run_location(parent, config.tracking)
    tables = Lake(config.lake.root, config.lake.storage_options).tables()
    return {
        "ingests": ingests,
        "hygiene": hygiene,
        "skipped_inputs": skipped,
        "tables": [t.__dict__ for t in tables],
        "mlflow_run": location,
        "ray_dashboard": dashboard,
        "lake": config.lake.root,
    }


def _first_benchmark_prompts(paths: list[str]) -> list[str]:
    for path in paths:
        files = sorted(Path(path).glob("*.json")) if Path(path).is_dir() else [Path(path)]
        if files:
            return benchmark_prompts(files[0])
    return []


def _text(result: dict[str, Any]) -> str:
    lines = [r["text"] for r in result["ingests"] + result["hygiene"]]
    lines += [f"skipped (not found): {p}" for p in result["skipped_inputs"]]
    lines += ["", f"lake {result['lake']}:", f"  {'table':<20}{'version':>8}{'rows':>14}"]
    lines += [f"  {t['name']:<20}{t['version']:>8}{t['rows']:>14,}" for t in result["tables"]]
    lines += [
        "",
        f"MLflow: {result['mlflow_run']}",
        f"Ray dashboard: {result['ray_dashboard'] or 'not available (ray[default] dashboard off)'}",
        "Next: synpref tables | synpref history curation_status | synpref ingest PATH --source X",
    ]
    return "\n".join(lines)


@click.command("demo")
@global_options
@json_option
@click.pass_context
def command(ctx: click.Context, as_json: bool, **options: Any) -> None:
    """Run the main job on the embedded defaults: generate, ingest, dedup, decontaminate."""
    result = run_demo(resolve_config(ctx, **options))
    text = _text(result)
    for r in result["ingests"] + result["hygiene"]:
        r.pop("text")
    emit(result, text, as_json)


if __name__ == "__main__":
    command()
