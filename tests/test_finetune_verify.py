"""The adapter check run before an adapter is committed (both trainers): it must parse, and no tensor may be
empty or all zero. Also: which finetune modules may import torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from alignfake.finetune.verify import AdapterCheckError, check_adapter, check_safetensors

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def adapter_dir(tmp_path: Path, tensors: dict[str, np.ndarray]) -> Path:
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    return tmp_path


def test_a_trained_adapter_passes_with_its_sizes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    d = adapter_dir(tmp_path, {A: rng.standard_normal((4, 8)).astype(np.float32),
                               B: rng.standard_normal((8, 4)).astype(np.float16)})
    stats = check_adapter(d)
    assert (stats.tensors, stats.parameters) == (2, 64)
    assert stats.bytes == (d / "adapter_model.safetensors").stat().st_size


def test_an_all_zero_lora_b_is_refused_naming_it(tmp_path: Path) -> None:
    d = adapter_dir(tmp_path, {A: np.ones((4, 8), np.float32), B: np.zeros((8, 4), np.float32)})
    with pytest.raises(AdapterCheckError, match=r"1 all-zero \(e.g. .*lora_B.weight\) of 2 adapter tensors"):
        check_adapter(d)


def test_negative_zero_counts_as_zero(tmp_path: Path) -> None:
    d = adapter_dir(tmp_path, {A: np.ones((2, 2), np.float32), B: np.full((2, 2), -0.0, np.float32)})
    with pytest.raises(AdapterCheckError, match="1 all-zero"):
        check_adapter(d)


def test_bfloat16_tensors_are_checked_without_numpy_support(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch

    save_torch({A: torch.ones(4, 8, dtype=torch.bfloat16), B: torch.zeros(8, 4, dtype=torch.bfloat16)},
               str(tmp_path / "w.safetensors"))
    with pytest.raises(AdapterCheckError, match="1 all-zero .*lora_B"):
        check_safetensors(tmp_path / "w.safetensors")
    save_torch({A: torch.ones(4, 8, dtype=torch.bfloat16), B: -torch.full((8, 4), 1e-3, dtype=torch.bfloat16)},
               str(tmp_path / "ok.safetensors"))
    assert check_safetensors(tmp_path / "ok.safetensors").tensors == 2


def test_empty_shards_are_refused(tmp_path: Path) -> None:
    d = adapter_dir(tmp_path, {A: np.ones((4, 8), np.float32), B: np.zeros((0,), np.float32)})
    with pytest.raises(AdapterCheckError, match=r"1 empty \(e.g. .*lora_B"):
        check_adapter(d)


def test_missing_truncated_or_foreign_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(AdapterCheckError, match="adapter_config.json: missing"):
        check_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterCheckError, match="adapter_model.safetensors: missing"):
        check_adapter(tmp_path)
    w = tmp_path / "adapter_model.safetensors"
    w.write_bytes(b"PK\x03\x04 not safetensors at all")
    with pytest.raises(AdapterCheckError, match="not a safetensors file"):
        check_adapter(tmp_path)
    save_file({A: np.ones((64, 64), np.float32)}, str(w))
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(AdapterCheckError, match="truncated"):
        check_adapter(tmp_path)
    save_file({}, str(w))
    with pytest.raises(AdapterCheckError, match="holds no tensors"):
        check_adapter(tmp_path)


@pytest.mark.parametrize("module", ["alignfake.finetune", "alignfake.finetune.plan", "alignfake.finetune.axolotl",
                                    "alignfake.finetune.commands", "alignfake.stages.finetune"])
def test_finetune_modules_import_no_torch(module: str) -> None:
    code = (f"import {module}, sys, json\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'peft', 'accelerate', 'safetensors'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
