"""What every stage shares: the run context, the store keys, and the fingerprints that decide what is done,
what is pending and what is stale.

Fingerprints chain: finetune(model) <- base model + finetune section + document contents; sample(shard) <-
model serving + finetune fingerprint + scenario prompts + evaluation settings + the shard's query texts;
classify(shard) <- sample(shard) + judges; reduce <- every classify fingerprint + tiers. So a change to the
judges reruns classify and reduce only, a change to the model or the queries reruns everything downstream, and
an unchanged spec reruns nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, cached_property
from typing import Any, Literal

from ..data.loaders import LoadReport, Row, load_rows
from ..errors import SpecError, StaleOutputError
from ..progress import ProgressFactory, no_progress
from ..spec import EMBEDDED_MODEL, Experiment, ModelSpec
from ..store import Store, fingerprint, sha256_file

Stage = Literal["finetune", "sample", "classify", "reduce"]
STAGES: tuple[Stage, ...] = ("finetune", "sample", "classify", "reduce")

@dataclass
class Context:
    """Everything a stage needs besides its own arguments."""

    exp: Experiment
    store: Store
    recompute: bool = False
    progress: ProgressFactory = no_progress
    log: Callable[[str], None] = lambda msg: None
    engine_options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for engine factories (tests inject a ready ``engine=``)."""

    @cached_property
    def queries(self) -> list[Row]:
        return load_rows(self.exp.spec.evaluation.queries, field_path="spec.evaluation.queries", strict=True)

    @cached_property
    def shards(self) -> list[list[Row]]:
        size = self.exp.spec.evaluation.shard_size
        rows = self.queries
        return [rows[i * size : (i + 1) * size] for i in range(math.ceil(len(rows) / size))]

    def documents(self, model: ModelSpec) -> tuple[list[Row], LoadReport]:
        """The model's documents, loaded once per run (the fingerprint and the trainer both need them, and a
        30k-document source on S3 or the Hub is worth reading only once)."""
        assert model.finetune is not None
        cache = self.__dict__.setdefault("_documents", {})
        if model.name not in cache:
            report = LoadReport()
            rows = load_rows(
                model.finetune.documents,
                field_path=f"spec.models[{self.model_index(model)}].finetune.documents",
                strict=False,
                report=report,
            )
            cache[model.name] = (rows, report)
        return cache[model.name]

    def model_index(self, model: ModelSpec) -> int:
        return [m.name for m in self.exp.spec.models].index(model.name)

    # -- fingerprints --------------------------------------------------------------------------------------
    def finetune_fp(self, model: ModelSpec) -> str | None:
        if model.finetune is None:
            return None
        return self._cached(("finetune", model.name), lambda: _finetune_fp(self, model))

    def sample_fp(self, model: ModelSpec, shard: int) -> str:
        return self._cached(("sample", model.name, shard), lambda: _sample_fp(self, model, shard))

    def classify_fp(self, model: ModelSpec, shard: int) -> str:
        return fingerprint("classify", self.sample_fp(model, shard), self._cached(("judges",), self._judges_fp))

    def _judges_fp(self) -> str:
        """The judges' settings and the contents of any user prompt files (an edited file reruns classify)."""
        judges = self.exp.spec.judges
        files = {}
        for name in ("compliance", "partial_compliance", "af_reasoning"):
            path = getattr(judges, name).prompt_file
            if path:
                try:
                    files[name] = sha256_file(path)
                except OSError as e:
                    raise SpecError(str(path), [f"spec.judges.{name}.prompt_file: cannot read: {e}"]) from None
        return fingerprint(judges.model_dump(mode="json"), files)

    def reduce_fp(self) -> str:
        parts = [
            (m.name, s, self.classify_fp(m, s)) for m in self.exp.spec.models for s in range(len(self.shards))
        ]
        return fingerprint("reduce", parts, self.exp.spec.evaluation.tiers)

    def _cached(self, key: tuple[Any, ...], fn: Callable[[], str]) -> str:
        cache = self.__dict__.setdefault("_fp_cache", {})
        if key not in cache:
            cache[key] = fn()
        return cache[key]

    # -- commit helpers ---------------------------------------------------------------------------------------
    def is_done(self, piece: str, fp: str) -> bool:
        """True if committed with ``fp``. With ``recompute``, a stale piece is removed and reported pending;
        without it, a stale piece raises StaleOutputError."""
        try:
            return self.store.committed(piece, fp) is not None
        except StaleOutputError:
            if not self.recompute:
                raise
            self.log(f"recompute: removing stale {piece}")
            self.store.uncommit(piece)
            return False


@cache
def base_identity(base: str) -> str:
    """What identifies a base model in fingerprints: the name, and for the embedded model its recipe too (a
    rebuilt tiny model is another model)."""
    if base == EMBEDDED_MODEL:
        from ..tinymodel import tiny_model_hash

        return f"{base}@{tiny_model_hash(library_versions=False)[:16]}"
    return base


def _finetune_fp(ctx: Context, model: ModelSpec) -> str:
    docs, _ = ctx.documents(model)
    ft = model.finetune.model_dump(mode="json", exclude={"gpus", "trainer", "save_steps"})  # type: ignore[union-attr]
    return fingerprint("finetune", base_identity(model.base), ft, [(d.id, d.text) for d in docs])


def _sample_fp(ctx: Context, model: ModelSpec, shard: int) -> str:
    from ..scenarios import scenario_fingerprint

    ev = ctx.exp.spec.evaluation
    settings = ev.model_dump(mode="json", exclude={"queries", "scenario", "shard_size"})
    serving = {
        "base": base_identity(model.base),
        "provider": model.provider,
        "precision": model.serving_precision,
        "prefill": model.inference.prefill,
        "base_url": model.inference.base_url,
    }
    rows = [(r.id, r.text) for r in ctx.shards[shard]]
    return fingerprint(
        "sample", serving, ctx.finetune_fp(model), scenario_fingerprint(ev.scenario), settings, shard, rows
    )


# -- store keys ------------------------------------------------------------------------------------------------


def completions_key(model: str, shard: int) -> str:
    return f"completions/{model}/shard-{shard:05d}.jsonl"


def labels_key(model: str, shard: int) -> str:
    return f"labels/{model}/shard-{shard:05d}.jsonl"


def adapter_key(model: str) -> str:
    return f"adapters/{model}/final"


def checkpoints_prefix(model: str) -> str:
    return f"adapters/{model}/checkpoints"


RESULTS_KEY = "results"
RESULT_FILES = ("summary.csv", "summary.parquet", "report.md", "compliance_gap.png", "labels.parquet")


def shards_for(index: int, count: int, total: int) -> list[int]:
    """Shards a worker ``index`` of ``count`` takes (Indexed Job pods): every ``count``-th."""
    return list(range(index, total, count))
