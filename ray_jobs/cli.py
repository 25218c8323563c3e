"""The `synpref` command: one entry point for every job of the platform."""

from __future__ import annotations

from typing import Any

import click

from ray_jobs import (
    annotate,
    decontaminate,
    dedup,
    demo,
    evaluate,
    generate,
    ingest,
    judge,
    labels,
    lake_tables,
    loop,
    review,
    score,
    serve,
    show_config,
    submit,
    train,
)
from ray_jobs.job import configure_logging, global_options, json_option, take_over_ray_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@global_options
@json_option
@click.pass_context
def cli(ctx: click.Context, **options: Any) -> None:
    """synpref: curate LLM preference data at scale and train reward models on it.

    Configuration: configs/local.yaml by default (local Ray, Delta lake in ./lake, MLflow in
    sqlite:///mlruns.db), overridden by SYNPREF_<SECTION>__<KEY> environment variables, then by
    the flags below. Every command that does work ends with a summary; --json prints it as one
    JSON object.
    """
    ctx.obj = options
    take_over_ray_logging()


cli.add_command(ingest.command)
cli.add_command(lake_tables.tables_command)
cli.add_command(lake_tables.history_command)
cli.add_command(generate.command)
cli.add_command(dedup.command)
cli.add_command(decontaminate.command)
cli.add_command(score.command)
cli.add_command(annotate.command)
cli.add_command(judge.command)
cli.add_command(review.command)
cli.add_command(labels.command)
cli.add_command(evaluate.command)
cli.add_command(serve.command)
cli.add_command(train.command)
cli.add_command(demo.command)
cli.add_command(loop.command)
cli.add_command(show_config.command)
cli.add_command(submit.submit_command)
cli.add_command(submit.jobs_group)


def main() -> None:
    configure_logging(take_over_ray=False)
    cli()


if __name__ == "__main__":
    main()
