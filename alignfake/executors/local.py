"""The embedded executor: every stage of an experiment, in this process, in order."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..errors import StaleOutputError
from ..progress import no_progress
from ..spec import Experiment
from ..stages.common import RESULTS_KEY, Context, adapter_key, completions_key, labels_key
from ..store import Store, store_for


@dataclass
class PieceState:
    stage: str
    model: str | None
    committed: int
    pending: int
    stale: int

    @property
    def state(self) -> str:
        if self.stale:
            return "stale"
        return "done" if not self.pending else ("partial" if self.committed else "pending")


def _state(store: Store, piece: str, fp: str) -> str:
    try:
        return "committed" if store.committed(piece, fp) is not None else "pending"
    except StaleOutputError:
        return "stale"


def experiment_status(ctx: Context) -> list[PieceState]:
    """Per stage and model: how many pieces are committed, pending and stale (changed inputs)."""
    rows: list[PieceState] = []
    exp, store = ctx.exp, ctx.store

    def tally(stage: str, model: str | None, states: list[str]) -> None:
        rows.append(PieceState(stage, model, states.count("committed"), states.count("pending"), states.count("stale")))

    for m in exp.spec.models:
        if m.finetune is not None:
            tally("finetune", m.name, [_state(store, adapter_key(m.name), ctx.finetune_fp(m) or "")])
    n = len(ctx.shards)
    for m in exp.spec.models:
        tally("sample", m.name, [_state(store, completions_key(m.name, s), ctx.sample_fp(m, s)) for s in range(n)])
    for m in exp.spec.models:
        tally("classify", m.name, [_state(store, labels_key(m.name, s), ctx.classify_fp(m, s)) for s in range(n)])
    tally("reduce", None, [_state(store, RESULTS_KEY, ctx.reduce_fp())])
    return rows


def check_not_stale(ctx: Context) -> None:
    """Refuse before any work if committed output came from other inputs (unless recomputing)."""
    if ctx.recompute:
        return
    stale = [r for r in experiment_status(ctx) if r.stale]
    if stale:
        what = ", ".join(f"{r.stage}" + (f"/{r.model}" if r.model else "") for r in stale)
        raise StaleOutputError(
            f"the spec changed since these outputs were committed in {ctx.store.uri}: {what}. "
            "Rerun with --recompute to replace them (other outputs are kept)."
        )


@contextmanager
def rich_progress(enabled: bool = True) -> Iterator[Callable[[str, int], Any]]:
    """A progress-factory for Context: one bar per stage and model."""
    if not enabled:
        yield no_progress
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=False
    ) as progress:

        @contextmanager
        def factory(description: str, total: int) -> Iterator[Callable[[int], None]]:
            task = progress.add_task(description, total=total)
            yield lambda n=1: progress.advance(task, n)
            progress.update(task, completed=total)

        yield factory


def run_experiment(
    exp: Experiment,
    *,
    recompute: bool = False,
    show_progress: bool = True,
    log: Callable[[str], None] = lambda m: None,
    engine_options: dict[str, Any] | None = None,
    stages: tuple[str, ...] = ("finetune", "sample", "classify", "reduce"),
) -> Any:
    """Run every stage locally; returns the reduce stage's summary (a DataFrame)."""
    from ..stages.classify import run_classify
    from ..stages.reduce import run_reduce
    from ..stages.sample import run_sample

    store = store_for(exp)
    store.check()
    with rich_progress(show_progress) as progress:
        ctx = Context(exp, store, recompute=recompute, progress=progress, log=log,
                      engine_options=dict(engine_options or {}))
        check_not_stale(ctx)
        store.write_text("spec.yaml", exp.to_yaml())
        if "finetune" in stages:
            for m in exp.spec.models:
                if m.finetune is not None:
                    from ..stages.finetune import run_finetune

                    run_finetune(ctx, m)
        if "sample" in stages:
            for m in exp.spec.models:
                run_sample(ctx, m)
        if "classify" in stages:
            for m in exp.spec.models:
                run_classify(ctx, m)
        summary = run_reduce(ctx) if "reduce" in stages else None
    return summary
