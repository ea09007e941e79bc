"""Import cost and layering: the CLI's light commands never load torch, transformers or other heavy stacks,
and the public API stays small."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

HEAVY = ("torch", "transformers", "peft", "vllm", "accelerate", "datasets", "openai", "anthropic")


def modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip().splitlines()[-1]
    return set(json.loads(out))


def heavy_in(mods: set[str]) -> list[str]:
    return sorted(m for m in mods if m.split(".")[0] in HEAVY)


def test_import_alignfake_loads_no_heavy_package() -> None:
    assert heavy_in(modules_after("import alignfake, alignfake.cli, alignfake.spec, alignfake.store")) == []


def _cli(args: list[str]) -> str:
    return f"""
import sys
from alignfake.cli import cli
try:
    cli({args!r}, standalone_mode=False)
except SystemExit:
    pass
"""


def test_help_validate_and_reduce_do_not_import_torch(tmp_path: Path) -> None:
    spec = tmp_path / "e.yaml"
    spec.write_text(yaml.safe_dump({"apiVersion": "alignfake.dev/v1alpha1", "kind": "Experiment",
                                    "metadata": {"name": "e"}, "spec": {"models": [{"name": "m"}]}}))
    labels = tmp_path / "labels.csv"
    labels.write_text("model,tier,query_id,sample,compliant,af_reasoning\n"
                      "m,free,q1,0,true,false\nm,paid,q1,0,false,false\n")
    for args in (["--help"], ["validate", str(spec)], ["reduce", "--labels", str(labels), "--out", str(tmp_path / "r")]):
        mods = modules_after(_cli(args))
        assert heavy_in(mods) == [], (args, heavy_in(mods))


@pytest.mark.parametrize("module", ["alignfake.spec", "alignfake.store", "alignfake.stages.reduce", "alignfake.stats"])
def test_light_modules_never_import_torch(module: str) -> None:
    assert heavy_in(modules_after(f"import {module}")) == []


def test_stages_do_not_import_cli_kubernetes_or_executors() -> None:
    root = Path(__file__).resolve().parents[1] / "alignfake" / "stages"
    for f in root.glob("*.py"):
        text = f.read_text()
        for forbidden in ("from ..cli", "from ..executors", "import kubernetes", "from ..k8s"):
            assert forbidden not in text, f"{f.name} imports {forbidden}"


def test_public_api_is_small_and_stable() -> None:
    import alignfake

    assert sorted(alignfake.__all__) == sorted([
        "AlignfakeError", "DataError", "Experiment", "SpecError", "StaleOutputError", "StoreError",
        "load_experiment", "parse_experiment", "run_experiment", "__version__",
    ])
    for name in alignfake.__all__:
        assert hasattr(alignfake, name)
