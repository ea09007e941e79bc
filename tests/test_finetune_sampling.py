"""Acceptance: the quickstart's fine-tuning step (the embedded tiny model, LoRA on the shipped synthetic
documents) changes what the model samples. Runs the finetune and sample stages of an experiment with the base
model and the fine-tuned one side by side, through the transformers engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from alignfake.spec import parse_experiment
from alignfake.store import read_jsonl, store_for

QUICKSTART = Path(__file__).resolve().parents[1] / "manifests" / "examples" / "quickstart.yaml"
# The quickstart's fine-tuning section (its second model, `tiny-docs`).
DEMO_FINETUNE: dict[str, Any] = next(
    m["finetune"] for m in yaml.safe_load(QUICKSTART.read_text())["spec"]["models"] if m["name"] == "tiny-docs"
)


@pytest.fixture
def one_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_the_fine_tuned_tiny_model_samples_differently_from_the_base(tmp_path: Path, one_thread: None) -> None:
    from alignfake.executors.local import run_experiment

    exp = parse_experiment({
        "apiVersion": "alignfake.dev/v1alpha1", "kind": "Experiment", "metadata": {"name": "demo-ft"},
        "spec": {
            "storage": str(tmp_path / "runs"),
            "models": [
                {"name": "tiny", "base": "alignfake:tiny", "inference": {"batch_size": 16}},
                {"name": "tiny-docs", "base": "alignfake:tiny", "finetune": DEMO_FINETUNE,
                 "inference": {"batch_size": 16}},
            ],
            "evaluation": {"queries": {"source": "builtin:demo_queries", "limit": 6}, "max_tokens": 64,
                           "retries": 0, "shard_size": 6},
        },
    })
    logs: list[str] = []
    run_experiment(exp, show_progress=False, log=logs.append, stages=("finetune", "sample"))
    store = store_for(exp)
    marker = store.marker("adapters/tiny-docs/final")
    assert marker is not None and marker.meta["documents"]["kept"] == 40
    assert marker.meta["steps"] == 5 and marker.meta["device"] == "cpu"

    def texts(model: str) -> dict[str, str]:
        rows = read_jsonl(store.read_bytes(f"completions/{model}/shard-00000.jsonl"))
        return {r["id"]: r["completion"] for r in rows}

    base, tuned = texts("tiny"), texts("tiny-docs")
    assert base.keys() == tuned.keys() and len(base) == 12
    differ = sum(base[k] != tuned[k] for k in base)
    assert differ >= len(base) // 2, f"only {differ} of {len(base)} greedy completions changed"
