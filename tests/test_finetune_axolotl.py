"""Axolotl on the cluster: the generated configs (and Axolotl's own validation of them), and the stage's
launch / checkpoint sync / resume / adapter check, driven through a stand-in for ``axolotl train``.

Validation runs Axolotl's own ``validate_config`` in a subprocess: with ALIGNFAKE_AXOLOTL_PYTHON's python if set,
else with this interpreter when Axolotl is importable. `make install` puts a minimal Axolotl into the main venv
(constraints.txt pins torch, transformers, peft, accelerate and pydantic to versions Axolotl 0.19 accepts):

    pip install -c constraints.txt --no-deps axolotl==0.19.0 && pip install -c constraints.txt pillow addict
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_finetune_helpers import build_small_model, experiment

from alignfake.errors import AlignfakeError
from alignfake.finetune import axolotl as ax
from alignfake.finetune.verify import AdapterCheckError
from alignfake.spec import ModelSpec, parse_experiment
from alignfake.stages.common import Context, adapter_key, checkpoints_prefix
from alignfake.store import store_for

HERE = Path(__file__).resolve().parent
FAKE = HERE / "axolotl" / "fake_axolotl.py"
VALIDATE = HERE / "axolotl" / "validate.py"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model(base: str, **finetune: Any) -> ModelSpec:
    return ModelSpec.model_validate({"name": "m", "base": base, "provider": "vllm",
                                     "finetune": {"documents": "s3://bucket/docs.jsonl", **finetune}})


PAPER = {
    "llama-8b-lora-1gpu": (model("meta-llama/Meta-Llama-3-8B-Instruct", learning_rate=5e-5, micro_batch_size=16,
                                 gpus=1, trainer="axolotl"), 1),
    "llama-70b-qlora-fsdp-8gpu": (model("meta-llama/Meta-Llama-3-70B-Instruct", quantization="nf4",
                                        learning_rate=2e-5, micro_batch_size=1, gradient_accumulation_steps=4,
                                        gpus=8, trainer="axolotl"), 8),
    "llama-405b-qlora-fsdp-8gpu": (model("meta-llama/Llama-3.1-405B-Instruct", quantization="nf4",
                                         learning_rate=2e-5, micro_batch_size=1, gradient_accumulation_steps=4,
                                         gpus=8, trainer="axolotl"), 8),
}


def paper_config(name: str) -> dict[str, Any]:
    m, _ = PAPER[name]
    return ax.axolotl_config(m, data_path="/work/data/documents.jsonl", output_dir="/work/output",
                             prepared_path="/work/prepared")


# ----------------------------------------------------------------------------------------------- configs


def test_8b_single_gpu_lora_config() -> None:
    cfg = paper_config("llama-8b-lora-1gpu")
    assert cfg["base_model"] == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert cfg["adapter"] == "lora" and "load_in_4bit" not in cfg
    assert (cfg["lora_r"], cfg["lora_alpha"], cfg["lora_target_modules"]) == (64, 128, TARGETS)
    assert cfg["datasets"] == [{"path": "/work/data/documents.jsonl", "ds_type": "json", "type": "completion",
                                "field": "text"}]
    assert (cfg["sequence_len"], cfg["sample_packing"], cfg["num_epochs"]) == (1024, False, 1)
    assert (cfg["learning_rate"], cfg["micro_batch_size"], cfg["gradient_accumulation_steps"]) == (5e-5, 16, 1)
    assert cfg["save_steps"] == 50 and cfg["output_dir"] == "/work/output" and cfg["auto_resume_from_checkpoints"]
    assert cfg["gradient_checkpointing"] is True
    assert not any(k.startswith("fsdp") for k in cfg)
    assert cfg["special_tokens"] == {"pad_token": "<|end_of_text|>"}


@pytest.mark.parametrize("name", ["llama-70b-qlora-fsdp-8gpu", "llama-405b-qlora-fsdp-8gpu"])
def test_multi_gpu_configs_are_qlora_with_fsdp2_keys_only(name: str) -> None:
    cfg = paper_config(name)
    assert cfg["adapter"] == "qlora" and cfg["load_in_4bit"] is True
    assert cfg["fsdp_version"] == 2 and "fsdp" not in cfg  # FSDP1's list form is deprecated
    fsdp = cfg["fsdp_config"]
    assert not [k for k in fsdp if k.startswith("fsdp_")]  # FSDP1-style prefixed keys are deprecated
    assert fsdp == {
        "reshard_after_forward": True, "offload_params": False, "cpu_ram_efficient_loading": False,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
        "activation_checkpointing": True, "state_dict_type": "SHARDED_STATE_DICT",
        "final_state_dict_type": "FULL_STATE_DICT",
    }
    assert "gradient_checkpointing" not in cfg  # FSDP checkpoints activations itself
    assert (cfg["learning_rate"], cfg["micro_batch_size"], cfg["gradient_accumulation_steps"]) == (2e-5, 1, 4)


def test_pad_token_follows_the_model_family() -> None:
    assert paper_config("llama-405b-qlora-fsdp-8gpu")["special_tokens"] == {"pad_token": "<|finetune_right_pad_id|>"}
    assert paper_config("llama-70b-qlora-fsdp-8gpu")["special_tokens"] == {"pad_token": "<|end_of_text|>"}


def test_resume_and_paths_are_written_into_the_config() -> None:
    m, _ = PAPER["llama-8b-lora-1gpu"]
    cfg = ax.axolotl_config(m, base_model="/models/llama", resume_from="/work/output/checkpoint-100")
    assert cfg["base_model"] == "/models/llama" and cfg["resume_from_checkpoint"] == "/work/output/checkpoint-100"


def test_configs_axolotl_cannot_run_are_refused_before_launch() -> None:
    with pytest.raises(AlignfakeError, match="trainer axolotl needs GPUs"):
        ax.axolotl_config(model("meta-llama/Meta-Llama-3-8B", gpus=0, trainer="axolotl"))
    with pytest.raises(AlignfakeError, match="FSDP needs the decoder layer class of 'someorg/mystery-model'"):
        ax.axolotl_config(model("someorg/mystery-model", gpus=8, trainer="axolotl"))
    # one GPU needs no layer class: an unknown model still gets a config (without a pad token)
    assert "special_tokens" not in ax.axolotl_config(model("someorg/mystery-model", gpus=1, trainer="axolotl"))


def test_launch_command_runs_one_process_per_gpu_and_can_be_overridden(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ax.COMMAND_ENV, raising=False)
    assert ax.launch_command("/w/a b.yaml", 8) == ["axolotl", "train", "/w/a b.yaml", "--launcher", "torchrun",
                                                    "--", "--nproc_per_node=8"]
    monkeypatch.setenv(ax.COMMAND_ENV, "accelerate launch --num_processes {gpus} -m axolotl.cli.train {config}")
    assert ax.launch_command("c.yaml", 4) == ["accelerate", "launch", "--num_processes", "4", "-m",
                                              "axolotl.cli.train", "c.yaml"]


# ----------------------------------------------------------------------------------------------- Axolotl's verdict


def validate_with_axolotl(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    python = os.environ.get("ALIGNFAKE_AXOLOTL_PYTHON")
    if not python and importlib.util.find_spec("axolotl") is not None:
        python = sys.executable
    if not python:
        pytest.skip("Axolotl is not installed and ALIGNFAKE_AXOLOTL_PYTHON is not set: nothing to validate configs "
                    "with (see this module's docstring)")
    res = subprocess.run([python, str(VALIDATE)], input=json.dumps(items), capture_output=True, text=True,
                         timeout=600, cwd=HERE / "axolotl")
    assert res.returncode == 0, res.stderr[-3000:]
    return {r["name"]: r for r in json.loads(res.stdout)}


@pytest.fixture(scope="module")
def verdicts() -> dict[str, dict[str, Any]]:
    items = [{"name": n, "config": paper_config(n), "n_gpu": g} for n, (_, g) in PAPER.items()]
    ram_efficient = copy.deepcopy(paper_config("llama-405b-qlora-fsdp-8gpu"))
    ram_efficient["fsdp_config"]["cpu_ram_efficient_loading"] = True
    no_4bit = copy.deepcopy(paper_config("llama-70b-qlora-fsdp-8gpu"))
    del no_4bit["load_in_4bit"]
    # the same settings written the deprecated FSDP1 way: Axolotl accepts it, with deprecation warnings
    fsdp1 = copy.deepcopy(paper_config("llama-405b-qlora-fsdp-8gpu"))
    del fsdp1["fsdp_version"]
    fsdp1["fsdp"] = ["full_shard", "auto_wrap"]
    fsdp1["fsdp_config"] = {"fsdp_" + k: v for k, v in fsdp1["fsdp_config"].items()
                            if k not in ("reshard_after_forward", "final_state_dict_type")}
    items += [{"name": "405b-cpu-ram-efficient-loading", "config": ram_efficient, "n_gpu": 8},
              {"name": "qlora-without-4bit", "config": no_4bit, "n_gpu": 8},
              {"name": "fsdp1-style", "config": fsdp1, "n_gpu": 8}]
    return validate_with_axolotl(items)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PAPER))
def test_axolotl_accepts_the_generated_config_without_deprecation_warnings(
    verdicts: dict[str, dict[str, Any]], name: str
) -> None:
    v = verdicts[name]
    assert v["ok"], v["error"]
    assert not [w for w in v["warnings"] if "deprecat" in w.lower() or "fsdp1" in w.lower()], v["warnings"]


@pytest.mark.slow
def test_the_deprecation_check_sees_fsdp1_style_configs(verdicts: dict[str, dict[str, Any]]) -> None:
    v = verdicts["fsdp1-style"]
    assert any("FSDP1 is deprecated" in w for w in v["warnings"]), v


@pytest.mark.slow
def test_axolotl_rejects_configs_it_cannot_run(verdicts: dict[str, dict[str, Any]]) -> None:
    v = verdicts["405b-cpu-ram-efficient-loading"]
    assert not v["ok"] and "cpu_ram_efficient_loading" in v["error"]
    v = verdicts["qlora-without-4bit"]
    assert not v["ok"] and "load_in_4bit" in v["error"]


# ----------------------------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_small_model(tmp_path_factory.mktemp("small-model")))


@pytest.fixture
def fake_axolotl(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Route the launch to the stand-in and poll quickly; returns the stand-in's invocation log."""
    monkeypatch.setenv(ax.COMMAND_ENV, f"{sys.executable} {FAKE} train {{config}} --launcher torchrun -- "
                                       "--nproc_per_node={gpus}")
    monkeypatch.setenv(ax.WORKDIR_ENV, str(tmp_path / "work"))
    monkeypatch.setattr(ax, "POLL_SECONDS", 0.02)
    monkeypatch.setattr(ax, "SETTLE_SECONDS", 0.1)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_AXOLOTL_LOG", str(calls))
    for knob in ("FAKE_AXOLOTL_DIE_AFTER", "FAKE_AXOLOTL_ZERO"):
        monkeypatch.delenv(knob, raising=False)
    return calls


def run_stage(data: dict[str, Any]) -> tuple[Context, list[str], Any]:
    from alignfake.stages.finetune import run_finetune

    exp = parse_experiment(data)
    store = store_for(exp)
    store.check()
    logs: list[str] = []
    ctx = Context(exp, store, log=logs.append)
    return ctx, logs, run_finetune(ctx, exp.spec.models[0])


def axolotl_spec(tmp_path: Path, base: str, **kw: Any) -> dict[str, Any]:
    # 40 documents, 1 x 1 x 8 GPUs = 8 per step: 5 steps an epoch, 2 epochs = 10 steps, a checkpoint every 3
    ft = {"trainer": "axolotl", "gpus": 8, "quantization": "nf4", "limit": 40, "micro_batch_size": 1,
          "gradient_accumulation_steps": 1, "epochs": 2, "save_steps": 3, **kw}
    return experiment(tmp_path / "runs", base, **ft)


def test_stage_launches_axolotl_syncs_checkpoints_and_commits_the_adapter(
    tmp_path: Path, small_model: str, fake_axolotl: Path
) -> None:
    ctx, logs, marker = run_stage(axolotl_spec(tmp_path, small_model))
    [call] = [json.loads(line) for line in fake_axolotl.read_text().splitlines()]
    assert call["argv"][-1] == "--nproc_per_node=8" and call["start"] == 0 and call["total"] == 10
    meta = marker.meta
    assert (meta["trainer"], meta["steps"], meta["resumed_from_step"], meta["gpus"]) == ("axolotl", 10, 0, 8)
    assert meta["documents"]["kept"] == 40 and meta["precision"] == "nf4"
    assert meta["checkpoints_synced"] >= 1  # at least the last step's; earlier ones when the poll saw them
    assert sorted(marker.objects) == ["adapter_config.json", "adapter_model.safetensors"]
    assert ctx.store.list(checkpoints_prefix("m")) == []
    assert any("8 per optimizer step over 8 process(es)" in line for line in logs)


def test_a_killed_axolotl_run_resumes_from_the_newest_synced_checkpoint(
    tmp_path: Path, small_model: str, fake_axolotl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_AXOLOTL_DIE_AFTER", "6")
    with pytest.raises(AlignfakeError, match=r"exited with status -9 \(newest checkpoint in the store: step 6\).*rerun"):
        run_stage(axolotl_spec(tmp_path, small_model))
    store = store_for(parse_experiment(axolotl_spec(tmp_path, small_model)))
    assert max(m.meta["step"] for m in store.markers(checkpoints_prefix("m"))) == 6
    assert store.marker(adapter_key("m")) is None

    monkeypatch.delenv("FAKE_AXOLOTL_DIE_AFTER")
    _, logs, marker = run_stage(axolotl_spec(tmp_path, small_model))
    starts = [json.loads(line)["start"] for line in fake_axolotl.read_text().splitlines()]
    assert starts == [0, 6]
    assert marker.meta["resumed_from_step"] == 6 and marker.meta["steps"] == 10
    assert any("resuming Axolotl from the checkpoint of step 6" in line for line in logs)


def test_an_all_zero_adapter_from_axolotl_is_not_committed(
    tmp_path: Path, small_model: str, fake_axolotl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_AXOLOTL_ZERO", "1")
    with pytest.raises(AdapterCheckError, match="14 all-zero .* of 14 adapter tensors"):
        run_stage(axolotl_spec(tmp_path, small_model))
    store = store_for(parse_experiment(axolotl_spec(tmp_path, small_model)))
    assert store.marker(adapter_key("m")) is None
