"""The ``alignfake plan`` command: GPUs, memory per GPU and GPU-hours per stage, before anything is submitted.

Registered on the ``alignfake`` group by ``alignfake/cli.py`` (``COMMANDS``). Arithmetic only: it never imports
torch.
"""

from __future__ import annotations

import json

import click

from ..cliutil import handle_errors, output_option, set_option
from ..cliutil import load as _load
from ..errors import AlignfakeError
from .plan import GPUS, Plan, PlanOptions, StagePlan, plan_experiment


class PlanRefused(AlignfakeError):
    """A stage of the experiment cannot fit on the GPUs it asks for."""

    exit_code = 2


@click.command("plan")
@click.argument("file", type=click.Path(dir_okay=False))
@set_option
@click.option("--gpu", type=click.Choice(sorted(GPUS)), default=None,
              help="GPU type (default: from the stage's node selector, else h100-80gb).")
@click.option("--mfu", type=click.FloatRange(0.01, 1.0), default=None,
              help="Model FLOP utilisation for fine-tuning (default: 0.35 LoRA, 0.25 QLoRA).")
@click.option("--documents", "n_documents", type=click.IntRange(min=1), default=None,
              help="Number of fine-tuning documents (default: counted when local, else finetune.limit).")
@click.option("--doc-tokens", type=click.FloatRange(min=1), default=None,
              help="Mean tokens per document (default: measured when local, else 60% of max_doc_tokens).")
@output_option
@handle_errors
def plan(file: str, overrides: tuple[str, ...], gpu: str | None, mfu: float | None, n_documents: int | None,
         doc_tokens: float | None, output: str) -> None:
    """Estimate GPUs, GPU memory per device and GPU-hours of each stage; exit 2 if a stage cannot fit."""
    exp = _load(file, overrides)
    result = plan_experiment(exp, PlanOptions(gpu=gpu, mfu=mfu, documents=n_documents, doc_tokens=doc_tokens))
    if output == "json":
        click.echo(json.dumps(result.as_json(), indent=2))
    else:
        _print(result)
    if result.problems:
        raise PlanRefused("; ".join(result.problems))


def _print(result: Plan) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table()
    for name in ("stage", "model", "device"):
        t.add_column(name, no_wrap=True)
    for name in ("GiB/GPU", "usable", "GPU-h", "wall h", "fits"):
        t.add_column(name, justify="right", no_wrap=True)
    for s in result.stages:
        t.add_row(s.stage, s.model or "-", s.device, _num(s.total_gib), _num(s.capacity_gib), _num(s.gpu_hours),
                  _num(s.wall_hours), _fits(s))
    console.print(t)
    for s in result.stages:
        if s.memory_gib or s.notes:
            console.print(f"[bold]{s.stage} {s.model or ''}[/bold]".rstrip())
            if s.memory_gib:
                parts = " + ".join(f"{k} {v:.1f}" for k, v in s.memory_gib.items())
                console.print(f"  memory per GPU: {parts} = {s.total_gib:.1f} GiB of {s.capacity_gib} usable")
            for note in s.notes:
                console.print(f"  {note}", highlight=False)
    console.print("[bold]assumptions[/bold]")
    for a in result.assumptions:
        console.print(f"  - {a}", highlight=False)


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"


def _fits(s: StagePlan) -> str:
    if s.problems:
        return "NO"
    return "yes" if s.memory_gib else "-"


COMMANDS = (plan,)
"""Commands for ``alignfake/cli.py`` to register on the ``alignfake`` group."""
