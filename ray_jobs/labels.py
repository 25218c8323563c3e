"""`synpref labels explain|undo`: why a pair has its label, and taking a decision back."""

from __future__ import annotations

from typing import Any

import click

from ray_jobs.job import (
    emit,
    global_options,
    json_option,
    main,
    resolve_config,
    user_errors,
)


@click.group("labels")
def command() -> None:
    """Labels with lineage: every decision on a pair is a row of `label_events`."""


@click.command("explain")
@click.argument("pair_id")
@global_options
@json_option
@click.pass_context
def explain(ctx: click.Context, pair_id: str, as_json: bool, **options: Any) -> None:
    """Every decision on PAIR_ID, oldest first, and the label they give it now."""
    from pipelines.core.lake import Lake
    from pipelines.core.sql import literal
    from pipelines.labels.events import derive_labels, explain, live_events

    config = resolve_config(ctx, **options)
    lake = Lake(config.lake.root, config.lake.storage_options)
    with user_errors():
        events = explain(lake, pair_id).to_pylist()
        live = live_events(lake, where=f"pair_id = {literal(pair_id)}")
        now = derive_labels(live, set(config.loop.human_sources)).to_pylist()
    lines = [f"pair {pair_id}: {len(events)} label events"]
    for e in events:
        what = f"undoes {e['revokes']}" if e["revokes"] else e["label"]
        where = f" ({e['loop']} {e['step']})" if e["loop"] else ""
        lines.append(
            f"  {e['decided_at']:%Y-%m-%d %H:%M} {e['event_id']} {e['origin']:<15} {what:<8} "
            f"by {e['who']}{where}: {e['evidence']}"
        )
    for label in now:
        lines.append(f"now: {label['label']} in {label['pool']} (decided by {label['event_id']})")
    emit({"events": events, "labels": now}, "\n".join(lines), as_json)


@click.command("undo")
@click.argument("event_id")
@click.option(
    "--reason", required=True, help="Why the decision is taken back (kept with the undo)."
)
@click.option("--who", default="cli", show_default=True, help="Who takes it back.")
@global_options
@json_option
@click.pass_context
def undo(
    ctx: click.Context, event_id: str, reason: str, who: str, as_json: bool, **options: Any
) -> None:
    """Take decision EVENT_ID back: the pair's label falls back to its other events."""
    from pipelines.core.lake import Lake
    from pipelines.labels.events import rebuild_labels
    from pipelines.labels.events import undo as undo_event

    config = resolve_config(ctx, **options)
    lake = Lake(config.lake.root, config.lake.storage_options)
    with user_errors():
        event = undo_event(lake, event_id, who, reason, None)
        rebuild_labels(lake, config.loop.human_sources)
    text = f"undone: {event_id} (undo event {event.event_id}); labels rebuilt"
    emit({"undone": event_id, "undo_event": event.event_id}, text, as_json)


command.add_command(explain)
command.add_command(undo)

if __name__ == "__main__":
    main(command)
