"""`synpref serve --model NAME=PATH ...`: the reward API on Ray Serve (see pipelines/serving)."""

from __future__ import annotations

import signal
import threading
from typing import Any

import click

from ray_jobs.job import global_options, main, resolve_config


def parse_models(specs: tuple[str, ...]) -> dict[str, str]:
    """``NAME=PATH`` (or a bare PATH, named after its last path component) -> {name: path}."""
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = spec.rstrip("/").rsplit("/", 1)[-1], spec
        if not name or not path:
            raise click.BadParameter(f"{spec!r}: expected NAME=PATH", param_hint="--model")
        if name in models:
            raise click.BadParameter(f"model name {name!r} given twice", param_hint="--model")
        models[name] = path
    return models


@click.command("serve")
@click.option(
    "--model",
    "models",
    multiple=True,
    required=True,
    help="NAME=PATH of a reward model (HF id or folder); repeat to serve several.",
)
@global_options
@click.pass_context
def command(ctx: click.Context, models: tuple[str, ...], **options: Any) -> None:
    """Serve reward models: POST /v1/score, GET /healthz, OpenAPI at /docs."""
    from ray import serve

    from pipelines.core.ray_cluster import connect
    from pipelines.rm.serving import APP_NAME, reward_app

    config = resolve_config(ctx, **options)
    served = parse_models(models)
    serving = config.serving
    connect(config.ray)
    stop_on_signals()  # after connecting: ray.init installs a SIGTERM handler that aborts
    try:
        serve.start(http_options={"host": serving.host, "port": serving.port})
        serve.run(reward_app(served, config.scoring, serving), name=APP_NAME, route_prefix="/")
        click.echo(
            f"[serve] {', '.join(served)} at http://{serving.host}:{serving.port}/v1/score "
            "(Ctrl-C or SIGTERM stops)",
            err=True,
        )
        threading.Event().wait()
    except Stopped:
        pass
    finally:
        click.echo("[serve] stopping", err=True)
        serve.shutdown()
        click.echo("[serve] stopped", err=True)


class Stopped(Exception):
    """SIGINT or SIGTERM arrived."""


def stop_on_signals() -> None:
    """SIGINT or SIGTERM (what Kubernetes sends) raise ``Stopped`` wherever the server is, even
    while it waits for its replicas, so Serve is shut down cleanly instead of the process dying
    with a stack dump and leaving its actors on the cluster."""

    def stopped(*_: object) -> None:
        raise Stopped

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stopped)


if __name__ == "__main__":
    main(command)
