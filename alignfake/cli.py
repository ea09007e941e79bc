"""The ``alignfake`` command line: parse, call one library function, print. Heavy modules are imported inside
the commands that need them, so ``--help``, ``validate``, ``reduce``, ``render`` and ``submit`` never load
torch or transformers."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from .cliutil import fail as _fail
from .cliutil import handle_errors, output_option, set_option
from .cliutil import load as _load
from .errors import SpecError


def _note(exp: Any) -> str | None:
    from .stages.reduce import embedded_note

    return embedded_note(exp)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="alignfake")
def cli() -> None:
    """Run alignment-faking experiments and report compliance gaps (free-tier minus paid-tier compliance)."""


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@set_option
def validate(file: str, overrides: tuple[str, ...]) -> None:
    """Check an experiment file; print `ok` or one line per problem with its field path (exit 2)."""
    try:
        _load(file, overrides)
    except SpecError as e:
        _fail(e)
    click.echo("ok")


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@set_option
@click.option("--recompute", is_flag=True, help="Replace outputs committed from different inputs.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--stage", "stages", multiple=True, type=click.Choice(["finetune", "sample", "classify", "reduce"]),
              help="Run only these stages (repeatable); default: all.")
@output_option
@handle_errors
def run(file: str, overrides: tuple[str, ...], recompute: bool, no_progress: bool, stages: tuple[str, ...],
        output: str) -> None:
    """Run an experiment end to end in this process (the embedded default: no cluster needed)."""
    from .executors.local import run_experiment

    exp = _load(file, overrides)
    summary = run_experiment(
        exp,
        recompute=recompute,
        show_progress=not no_progress and output == "table",
        log=lambda m: click.echo(m, err=True),
        stages=stages or ("finetune", "sample", "classify", "reduce"),
    )
    if summary is not None:
        _print_summary(summary, output, note=_note(exp),
                       where=f"{exp.spec.storage.uri.rstrip('/')}/{exp.name}/results")


def _print_summary(summary: Any, output: str, note: str | None, where: str | None = None) -> None:
    if output == "json":
        click.echo(summary.to_json(orient="records", indent=2))
        return
    from rich.console import Console

    from .stages.reduce import format_table

    # a terminal gets its own width; a pipe or log gets room for the whole table instead of rich's 80 columns
    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(format_table(summary))
    if where:
        console.print(f"results: {where}/")
    if note:
        console.print(note)


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@set_option
@output_option
@click.option("--jobs/--no-jobs", "show_jobs", default=None,
              help="Also show the experiment's Kubernetes Jobs (default: when a kubeconfig or in-cluster config "
                   "exists).")
@click.option("--context", "kube_context", metavar="NAME", help="kubeconfig context for --jobs.")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), metavar="FILE", help="kubeconfig file for --jobs.")
@handle_errors
def status(file: str, overrides: tuple[str, ...], output: str, show_jobs: bool | None, kube_context: str | None,
           kubeconfig: str | None) -> None:
    """Show, per stage and model, what is committed, pending and stale in the store, and the Jobs' state."""
    from .executors.local import experiment_status
    from .stages.common import Context
    from .store import store_for

    exp = _load(file, overrides)
    rows = experiment_status(Context(exp, store_for(exp)))
    if show_jobs is None:
        show_jobs = bool(kubeconfig or os.environ.get("KUBECONFIG") or os.environ.get("KUBERNETES_SERVICE_HOST")
                         or (Path.home() / ".kube" / "config").is_file())
    jobs: list[dict[str, Any]] | None = None
    jobs_error = None
    if show_jobs:
        from .errors import AlignfakeError
        from .k8s.commands import job_status

        try:
            jobs = job_status(exp, kube_context=kube_context, kubeconfig=kubeconfig)
        except AlignfakeError as e:  # the store is still worth showing when the cluster is not reachable
            jobs_error = str(e)
    if output == "json":
        doc: dict[str, Any] = {"store": [{**r.__dict__, "state": r.state} for r in rows]}
        if show_jobs:
            doc["jobs"] = jobs if jobs is not None else {"error": jobs_error}
        click.echo(json.dumps(doc, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table("stage", "model", "committed", "pending", "stale", "state", title=f"store: {exp.name}")
    for r in rows:
        t.add_row(r.stage, r.model or "-", str(r.committed), str(r.pending), str(r.stale), r.state)
    Console().print(t)
    if jobs is not None:
        from .k8s.commands import print_job_status

        print_job_status(jobs)
    elif jobs_error:
        click.echo(f"jobs: {jobs_error}", err=True)


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False), required=False)
@set_option
@click.option("--labels", type=click.Path(exists=True, dir_okay=False),
              help="Reduce a label table produced elsewhere (CSV, JSONL or Parquet; see README for columns).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="With --labels: write results here.")
@click.option("--tiers", default=None, help="With --labels: tier order, e.g. free,paid (gap = first - second).")
@click.option("--recompute", is_flag=True, help="Replace results committed from different inputs.")
@output_option
@handle_errors
def reduce(file: str | None, overrides: tuple[str, ...], labels: str | None, out_dir: str | None,
           tiers: str | None, recompute: bool, output: str) -> None:
    """Compute rates, compliance gaps (paired bootstrap CI, McNemar p) and the report.

    Either FILE (an experiment whose labels are in its store) or --labels TABLE."""
    if labels:
        from .stages.reduce import load_label_table, summarize, write_results

        df = load_label_table(labels)
        summary = summarize(df, tiers=tiers.split(",") if tiers else None)
        if out_dir:
            write_results(summary, df, Path(out_dir), title=f"alignfake: {Path(labels).name}", note=None)
        _print_summary(summary, output, note=None, where=out_dir)
        return
    if not file:
        raise click.UsageError("give an experiment FILE or --labels TABLE")
    from .stages.common import Context
    from .stages.reduce import run_reduce
    from .store import store_for

    exp = _load(file, overrides)
    summary = run_reduce(Context(exp, store_for(exp), recompute=recompute))
    _print_summary(summary, output, note=_note(exp),
                   where=f"{exp.spec.storage.uri.rstrip('/')}/{exp.name}/results")


@cli.command()
@click.argument("name", type=click.Choice(["finetune", "sample", "classify", "reduce"]))
@click.argument("file", type=click.Path(dir_okay=False))
@set_option
@click.option("--model", "model_name", help="Model to run the stage for (all models if omitted).")
@click.option("--shard-index", type=int, default=None,
              help="This worker's index (default: $JOB_COMPLETION_INDEX, else 0).")
@click.option("--shard-count", type=int, default=1, show_default=True, help="Workers sharing the stage.")
@click.option("--recompute", is_flag=True, help="Replace outputs committed from different inputs.")
@handle_errors
def stage(name: str, file: str, overrides: tuple[str, ...], model_name: str | None, shard_index: int | None,
          shard_count: int, recompute: bool) -> None:
    """Run one stage (the entrypoint of Kubernetes Jobs)."""
    from .executors.local import check_not_stale
    from .stages.common import Context
    from .store import store_for

    exp = _load(file, overrides)
    index = shard_index if shard_index is not None else int(os.environ.get("JOB_COMPLETION_INDEX", "0"))
    if not 0 <= index < shard_count:
        raise click.BadParameter(f"shard index {index} is outside 0..{shard_count - 1}", param_hint="--shard-index")
    store = store_for(exp)
    store.check()
    ctx = Context(exp, store, recompute=recompute, log=lambda m: click.echo(m, err=True))
    check_not_stale(ctx)
    models = [exp.model(model_name)] if model_name else exp.spec.models
    if name == "reduce":
        from .stages.reduce import run_reduce

        run_reduce(ctx)
    elif name == "finetune":
        from .stages.finetune import run_finetune

        for m in models:
            if m.finetune is not None:
                run_finetune(ctx, m)
    elif name == "sample":
        from .stages.sample import run_sample

        for m in models:
            n = run_sample(ctx, m, index, shard_count)
            click.echo(f"sample {m.name}: committed {n} shard(s) as worker {index}/{shard_count}", err=True)
    else:
        from .stages.classify import run_classify

        for m in models:
            n = run_classify(ctx, m, index, shard_count)
            click.echo(f"classify {m.name}: committed {n} shard(s) as worker {index}/{shard_count}", err=True)


def _register() -> None:
    from .classifiers.judge_eval import judge_eval_command
    from .finetune.commands import COMMANDS as FINETUNE_COMMANDS
    from .k8s.commands import COMMANDS as K8S_COMMANDS
    from .operator_cli import operator

    for command in (*K8S_COMMANDS, *FINETUNE_COMMANDS, judge_eval_command, operator):
        cli.add_command(command)


_register()


def main() -> None:
    cli(prog_name=Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "alignfake")


if __name__ == "__main__":  # pragma: no cover
    main()
