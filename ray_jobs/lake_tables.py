"""`synpref tables` and `synpref history TABLE`: what the lake holds, and how it got there."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import click

from ray_jobs.job import emit, job_command, resolve_config


@job_command("tables")
def tables_command(ctx: click.Context, as_json: bool, **options: Any) -> None:
    """List the lake's tables with their version and row count."""
    from pipelines.core.lake import Lake
    from storage_schemas import SCHEMA_VERSION

    config = resolve_config(ctx, **options)
    infos = Lake(config.lake.root, config.lake.storage_options).tables()
    lines = [f"lake {config.lake.root} (schema v{SCHEMA_VERSION})"]
    lines += [f"  {'table':<20}{'version':>8}{'rows':>14}{'files':>8}"]
    lines += [f"  {i.name:<20}{i.version:>8}{i.rows:>14,}{i.files:>8}" for i in infos]
    if not infos:
        lines.append("  (no tables yet: run `synpref ingest` or `synpref demo`)")
    emit(
        {"lake": config.lake.root, "tables": [asdict(i) for i in infos]}, "\n".join(lines), as_json
    )


@job_command("history")
@click.argument("table")
@click.option("--limit", type=int, default=20, show_default=True)
def history_command(
    ctx: click.Context, table: str, limit: int, as_json: bool, **options: Any
) -> None:
    """Show the commits of TABLE, newest first."""
    from deltalake.exceptions import TableNotFoundError

    from pipelines.core.lake import Lake
    from storage_schemas import table_spec

    config = resolve_config(ctx, **options)
    lake = Lake(config.lake.root, config.lake.storage_options)
    try:
        table_spec(table)
        commits = lake.history(table, limit)
    except (KeyError, TableNotFoundError) as exc:
        raise click.ClickException(str(exc).strip("'\"")) from None
    lines = [f"history of {lake.uri(table)}"]
    for commit in commits:
        when = datetime.fromtimestamp(commit["timestamp"] / 1000, UTC).isoformat(timespec="seconds")
        metrics = commit.get("operationMetrics") or {}
        rows = metrics.get("num_target_rows_inserted", metrics.get("num_added_rows", ""))
        lines.append(
            f"  v{commit['version']:<5} {when}  {commit['operation']:<16}"
            + (f" +{rows} rows" if rows not in ("", None) else "")
        )
    emit({"table": table, "commits": commits}, "\n".join(lines), as_json)
