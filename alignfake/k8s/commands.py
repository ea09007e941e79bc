"""CLI commands for Kubernetes: ``render``, ``submit``, ``logs``, ``cancel``, and ``job_status`` for ``status``.

Registered on the ``alignfake`` group by ``alignfake/cli.py`` (and so available as ``kubectl alignfake ...``
through the ``kubectl-alignfake`` console script). Thin, like the rest of the CLI: parse, call one library
function, print. ``render`` never imports the kubernetes client; none of them imports torch.
"""

from __future__ import annotations

import json
import shlex
import sys
from typing import Any

import click

from ..cliutil import handle_errors, output_option, set_option
from ..cliutil import load as _load

STAGE_CHOICE = click.Choice(["finetune", "sample", "classify", "reduce"])

context_option = click.option("--context", "kube_context", metavar="NAME",
                              help="kubeconfig context to use (default: the current context).")
kubeconfig_option = click.option("--kubeconfig", type=click.Path(dir_okay=False), metavar="FILE",
                                 help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or in-cluster).")


def _cluster(kube_context: str | None, kubeconfig: str | None) -> Any:
    from ..executors.kubernetes import connect

    return connect(context=kube_context, kubeconfig=kubeconfig)


def _err(message: str) -> None:
    click.echo(message, err=True)


def _command_for(file: str, overrides: tuple[str, ...]) -> str:
    """How a user reruns a command on the same experiment (for hints in messages)."""
    return " ".join(shlex.quote(a) for a in [file, *(x for o in overrides for x in ("--set", o))])


@click.command()
@click.argument("file", type=click.Path(dir_okay=False))
@set_option
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Write one file per object plus kustomization.yaml into DIR (default: one YAML stream on "
                   "stdout, for `kubectl apply -f -`).")
@handle_errors
def render(file: str, overrides: tuple[str, ...], out_dir: str | None) -> None:
    """Render the experiment as Kubernetes objects: a ConfigMap with the spec, then per stage and model a Job.

    Deterministic: the same spec renders the same bytes. Files of an earlier render that no longer belong to
    the experiment are removed from DIR; other files are left alone."""
    from .render import render_experiment, write_files

    manifests = render_experiment(_load(file, overrides), source=file)
    if out_dir is None:
        click.echo(manifests.stream(), nl=False)
        return
    for path in write_files(manifests, out_dir):
        _err(f"wrote {path}")


@click.command()
@click.argument("file", type=click.Path(dir_okay=False))
@set_option
@click.option("--wait", is_flag=True,
              help="Watch the Jobs and apply each next stage when the previous one is done, until reduce.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="With --wait: stop watching after this long (the Jobs keep running).")
@click.option("--poll", "poll_s", type=click.FloatRange(min=0.01), default=10.0, show_default=True,
              metavar="SECONDS", help="With --wait: seconds between two looks at the Jobs.")
@output_option
@context_option
@kubeconfig_option
@handle_errors
def submit(file: str, overrides: tuple[str, ...], wait: bool, timeout_s: float | None, poll_s: float, output: str,
           kube_context: str | None, kubeconfig: str | None) -> None:
    """Run the experiment on Kubernetes: apply the spec and the first stage whose output is not committed.

    Server-side apply with field manager `alignfake`. A partly finished experiment starts at its first
    unfinished stage. With a Kueue queue the Jobs are created suspended and reported as queued until Kueue
    admits them. A failed Job stops the submission (exit 1) with its reason."""
    from ..executors.kubernetes import submit as submit_experiment

    exp = _load(file, overrides)
    cluster = _cluster(kube_context, kubeconfig)
    result = submit_experiment(
        exp, cluster, wait=wait, poll_s=poll_s, timeout_s=timeout_s, log=_err, source=file,
        logs_command=f"alignfake logs {_command_for(file, overrides)}",
    )
    if output == "json":
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    if result.state == "done":
        click.echo(f"{exp.name}: every stage is committed")
    else:
        what = "queued (waiting for Kueue admission)" if result.state == "queued" else "submitted"
        click.echo(f"{exp.name}: stage {result.stage} {what} in namespace {result.namespace}; "
                   f"follow it with `alignfake status {_command_for(file, overrides)}`")


@click.command()
@click.argument("file", type=click.Path(dir_okay=False))
@set_option
@click.option("--stage", required=True, type=STAGE_CHOICE, help="Stage whose pods to show.")
@click.option("--model", "model_name", default=None, help="Only this model's pods (default: every model's).")
@click.option("-f", "--follow", is_flag=True, help="Keep streaming while the pods run.")
@context_option
@kubeconfig_option
@handle_errors
def logs(file: str, overrides: tuple[str, ...], stage: str, model_name: str | None, follow: bool,
         kube_context: str | None, kubeconfig: str | None) -> None:
    """Print the logs of a stage's pods (each line prefixed by its pod when there are several)."""
    from ..executors.kubernetes import stream_logs

    exp = _load(file, overrides)
    if model_name is not None and model_name not in [m.name for m in exp.spec.models]:
        raise click.BadParameter(f"no model {model_name!r}; models: {', '.join(m.name for m in exp.spec.models)}",
                                 param_hint="--model")
    cluster = _cluster(kube_context, kubeconfig)
    stream_logs(exp, cluster, stage, model_name, click.echo, follow=follow)


@click.command()
@click.argument("file", type=click.Path(dir_okay=False))
@set_option
@output_option
@context_option
@kubeconfig_option
@handle_errors
def cancel(file: str, overrides: tuple[str, ...], output: str, kube_context: str | None,
           kubeconfig: str | None) -> None:
    """Delete the experiment's Jobs and their pods (propagation: background). The store keeps every committed
    output: `alignfake submit` later continues where it stopped."""
    from ..executors.kubernetes import cancel as cancel_experiment

    exp = _load(file, overrides)
    deleted = cancel_experiment(exp, _cluster(kube_context, kubeconfig))
    if output == "json":
        click.echo(json.dumps({"experiment": exp.name, "namespace": exp.spec.kubernetes.namespace,
                               "deleted": deleted}, indent=2))
        return
    for name in deleted:
        click.echo(f"deleted Job {exp.spec.kubernetes.namespace}/{name}")
    if not deleted:
        click.echo(f"{exp.name}: no Jobs in namespace {exp.spec.kubernetes.namespace}")


def job_status(exp: Any, *, kube_context: str | None = None, kubeconfig: str | None = None,
               cluster: Any = None) -> list[dict[str, Any]]:
    """The state of every Job of ``exp`` (one dict per Job: stage, model, job, namespace, state, active,
    succeeded, failed, completions, reason, message; state is absent, queued, suspended, pending, running,
    succeeded or failed). Raises ``alignfake.executors.kubernetes.ClusterError`` (an AlignfakeError) when the
    cluster cannot be reached: ``status`` can catch it and still show the store."""
    from ..executors.kubernetes import job_status as rows

    return rows(exp, cluster or _cluster(kube_context, kubeconfig))


def print_job_status(rows: list[dict[str, Any]]) -> None:
    """Print ``job_status`` rows as a table (for ``status``'s table output)."""
    from rich.console import Console
    from rich.table import Table

    t = Table("stage", "model", "job", "state", "pods done", "running", "failed", "reason")
    for r in rows:
        t.add_row(r["stage"], r["model"] or "-", r["job"], r["state"], f"{r['succeeded']}/{r['completions']}",
                  str(r["active"]), str(r["failed"]), r["reason"] or "")
    Console(file=sys.stdout).print(t)


COMMANDS = (render, submit, logs, cancel)
"""The commands to register on the ``alignfake`` group."""
