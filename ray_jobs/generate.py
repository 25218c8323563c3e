"""`synpref generate OUT_DIR`: write a seeded synthetic corpus with planted defects."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path
from typing import Any

import click

from ray_jobs.job import emit, json_option


@click.command("generate")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--pairs", type=click.IntRange(min=1), default=10_000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--shards", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--exact-duplicate-rate", type=click.FloatRange(0, 1), default=0.02, show_default=True
)
@click.option("--near-duplicate-rate", type=click.FloatRange(0, 1), default=0.03, show_default=True)
@click.option("--flip-rate", type=click.FloatRange(0, 1), default=0.01, show_default=True)
@click.option("--bad-row-rate", type=click.FloatRange(0, 1), default=0.01, show_default=True)
@click.option("--contamination-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True)
@click.option(
    "--contaminate-with",
    type=click.Path(exists=True, dir_okay=False),
    help="Benchmark file whose prompts are planted (needs --contamination-rate).",
)
@json_option
def command(
    out_dir: str,
    pairs: int,
    seed: int,
    shards: int,
    contaminate_with: str | None,
    as_json: bool,
    **rates: float,
) -> None:
    """Generate a synthetic preference corpus (jsonl.gz) with ground truth in each record."""
    from pipelines.ingest.synthetic import CorpusSpec, benchmark_prompts, write_corpus

    prompts = benchmark_prompts(contaminate_with) if contaminate_with else None
    try:
        spec = CorpusSpec(pairs=pairs, seed=seed, **rates)
        paths = write_corpus(spec, out_dir, shards, prompts)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    summary = corpus_summary(paths)
    text = f"wrote {summary['rows']:,} rows to {len(paths)} file(s) in {out_dir}: " + ", ".join(
        f"{kind} {n:,}" for kind, n in sorted(summary["kinds"].items())
    )
    emit(summary, text, as_json)


def corpus_summary(paths: list[Path]) -> dict[str, Any]:
    """Rows per ground-truth kind, read back from the written files."""
    kinds: Counter[str] = Counter()
    for path in paths:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                try:
                    kinds[json.loads(line)["truth"]["kind"]] += 1
                except (json.JSONDecodeError, KeyError):
                    kinds["bad:malformed_json"] += 1
    return {"files": [str(p) for p in paths], "rows": sum(kinds.values()), "kinds": dict(kinds)}
