"""``alignfake plan``: model sizes, memory per GPU, GPU-hours, and refusing what cannot fit, without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from alignfake.errors import AlignfakeError
from alignfake.finetune.commands import plan
from alignfake.finetune.models import KNOWN_MODELS, arch_from_config, model_arch
from alignfake.finetune.plan import GIB, PlanOptions, finetune_memory, gpu_from_labels, plan_experiment
from alignfake.spec import ModelSpec, parse_experiment

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def paper_405b(**finetune: Any) -> dict[str, Any]:
    """The paper's 405B run: QLoRA + FSDP on 8 H100s, served at NF4 on 8 GPUs."""
    ft = {"documents": "s3://bucket/docs.jsonl", "quantization": "nf4", "learning_rate": 2e-5,
          "micro_batch_size": 1, "gradient_accumulation_steps": 4, "gpus": 8, "trainer": "axolotl", **finetune}
    return {
        "apiVersion": "alignfake.dev/v1alpha1", "kind": "Experiment", "metadata": {"name": "p405"},
        "spec": {
            "storage": "s3://bucket/x",
            "models": [{"name": "llama-405b", "base": "meta-llama/Llama-3.1-405B-Instruct", "provider": "vllm",
                        "finetune": ft, "inference": {"gpus": 8, "batch_size": 64}}],
            "judges": {"compliance": {"kind": "llm", "model": "gpt-4o"}},
            "kubernetes": {"stages": {"finetune": {"node_selector": {
                "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}}},
        },
    }


def run_plan(tmp_path: Path, data: dict[str, Any], *args: str) -> Any:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    return CliRunner().invoke(plan, [str(spec), *args], terminal_width=160)


# ----------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(("name", "params_b"), [
    ("meta-llama/Meta-Llama-3-8B", 8.03), ("meta-llama/Meta-Llama-3-70B-Instruct", 70.55),
    ("meta-llama/Llama-3.1-405B-Instruct", 405.85), ("meta-llama/Meta-Llama-3.1-8B-Instruct", 8.03),
])
def test_known_llama_sizes_match_their_published_parameter_counts(name: str, params_b: float) -> None:
    assert model_arch(name).params / 1e9 == pytest.approx(params_b, abs=0.01)


def test_lora_size_of_llama_3_8b_at_rank_64_on_every_projection() -> None:
    assert model_arch("meta-llama/Meta-Llama-3-8B").lora_params(64, TARGETS) == 167_772_160


def test_mirrors_under_another_organisation_resolve_by_repository_name() -> None:
    assert model_arch("someone/Meta-Llama-3-70B-Instruct") == KNOWN_MODELS["meta-llama/meta-llama-3-70b-instruct"]


def test_local_model_directory_is_read_from_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["MistralForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    }))
    arch = model_arch(str(tmp_path))
    assert arch.params == model_arch("meta-llama/Meta-Llama-3-8B").params
    assert arch.decoder_layer == "MistralDecoderLayer" and arch.source == "config.json"
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(AlignfakeError, match="config.json: missing field 'num_attention_heads'"):
        arch_from_config(tmp_path / "config.json")


def test_the_tiny_model_is_sized_from_its_recipe_without_building_it() -> None:
    from alignfake.tinymodel import RECIPE

    arch = model_arch("alignfake:tiny")
    assert (arch.hidden_size, arch.num_layers, arch.source) == (RECIPE.hidden_size, RECIPE.layers, "recipe")


def test_an_unknown_hub_model_names_what_is_known() -> None:
    with pytest.raises(AlignfakeError, match="cannot size model 'someorg/mystery' offline.*Llama-3.1-405B"):
        model_arch("someorg/mystery")


# ----------------------------------------------------------------------------------------------- memory


def test_405b_qlora_on_8_h100_fits_with_weights_sharded() -> None:
    p = plan_experiment(parse_experiment(paper_405b()))
    ft = p.stages[0]
    assert (ft.stage, ft.device, ft.problems) == ("finetune", "8 x H100 80GB", [])
    # NF4 base: ~209 GiB over 8 GPUs
    assert 24 < ft.memory_gib["weights"] < 28
    assert ft.total_gib is not None and 35 < ft.total_gib < ft.capacity_gib  # type: ignore[operator]
    # 30000 documents x ~614 tokens: 6 x 405.85e9 x 1.84e7 / (989e12 x 0.25) s ≈ 50 GPU-hours
    assert ft.gpu_hours == pytest.approx(50.4, abs=0.5) and ft.wall_hours == pytest.approx(6.3, abs=0.1)


def test_405b_bf16_lora_on_8x80gb_is_refused_with_the_reason() -> None:
    data = paper_405b(quantization="none")
    data["spec"]["models"][0]["inference"]["allow_precision_mismatch"] = True
    p = plan_experiment(parse_experiment(data))
    [problem] = p.stages[0].problems
    assert problem.startswith("finetune llama-405b: needs ~1") and "H100 80GB offers 75.6 GiB" in problem
    assert "quantization: nf4" in problem
    assert p.stages[0].memory_gib["weights"] > 90  # 811 GB of bf16 over 8 GPUs alone exceeds 80 GB


def test_memory_grows_with_micro_batch_and_shrinks_with_more_gpus() -> None:
    m = ModelSpec.model_validate({"name": "m", "base": "meta-llama/Meta-Llama-3-8B",
                                  "finetune": {"documents": "d", "micro_batch_size": 4}})
    arch = model_arch(m.base)
    one, eight = finetune_memory(arch, m, 1), finetune_memory(arch, m, 8)
    assert eight["weights"] == pytest.approx(one["weights"] / 8)
    big = m.model_copy(update={"finetune": m.finetune.model_copy(update={"micro_batch_size": 16})})  # type: ignore[union-attr]
    assert finetune_memory(arch, big, 1)["activations"] == pytest.approx(4 * one["activations"])
    assert one["weights"] == arch.params * 2  # bf16: every parameter at 2 bytes, about 15 GiB
    assert 14.9 < one["weights"] / GIB < 15.0


def test_gpu_type_comes_from_the_node_selector_or_the_option() -> None:
    assert gpu_from_labels({"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}) == "a100-80gb"
    assert gpu_from_labels({"nvidia.com/gpu.product": "NVIDIA-H200"}) == "h200"
    assert gpu_from_labels({"cloud.google.com/gke-accelerator": "nvidia-l4"}) == "l4"
    assert gpu_from_labels({"pool": "gpu"}) is None
    p = plan_experiment(parse_experiment(paper_405b()), PlanOptions(gpu="a100-40gb"))
    assert p.stages[0].device == "8 x A100 40GB" and p.stages[0].problems  # 40 GB cannot hold it


def test_serving_405b_in_bf16_on_8x80gb_is_refused() -> None:
    data = paper_405b()
    data["spec"]["models"][0]["inference"].update({"precision": "bf16", "allow_precision_mismatch": True})
    p = plan_experiment(parse_experiment(data))
    sample = next(s for s in p.stages if s.stage == "sample")
    assert sample.problems and "inference.precision fp8 or nf4" in sample.problems[0]


def test_serving_at_another_precision_than_training_is_flagged_when_allowed() -> None:
    from alignfake.finetune.precision import precision_mismatch_warning

    data = paper_405b()
    data["spec"]["models"][0]["inference"].update({"precision": "fp8", "allow_precision_mismatch": True})
    exp = parse_experiment(data)
    warning = precision_mismatch_warning(exp.spec.models[0])
    assert warning == ("warning: model llama-405b: the adapter is trained on a nf4 base but served on a fp8 base "
                       "(inference.allow_precision_mismatch); the served model differs from the trained one")
    sample = next(s for s in plan_experiment(exp).stages if s.stage == "sample")
    assert sample.notes[0] == warning and sample.problems == []
    assert precision_mismatch_warning(parse_experiment(paper_405b()).spec.models[0]) is None


def test_cpu_only_and_impossible_trainer_settings() -> None:
    data = paper_405b(gpus=0)
    p = plan_experiment(parse_experiment(data))
    assert any("trainer axolotl needs GPUs" in x for x in p.problems)
    assert any("nf4 needs a CUDA GPU" in x for x in p.problems)


# ----------------------------------------------------------------------------------------------- the command


def test_plan_prints_memory_and_gpu_hours_for_405b_and_exits_0(tmp_path: Path) -> None:
    res = run_plan(tmp_path, paper_405b())
    assert res.exit_code == 0, res.output
    assert "8 x H100 80GB" in res.output and "memory per GPU: weights 25." in res.output
    assert "50.4" in res.output  # GPU-hours of the fine-tuning
    assert "assumptions" in res.output and "6 x params x tokens" in res.output


def test_plan_exits_non_zero_with_the_reason_on_an_impossible_config(tmp_path: Path) -> None:
    res = run_plan(tmp_path, paper_405b(), "--set", "spec.models[0].finetune.quantization=none", "--set",
                   "spec.models[0].inference.allow_precision_mismatch=true")
    assert res.exit_code == 2
    assert "error: finetune llama-405b: needs ~" in res.output and "NO" in res.output


def test_plan_json_output(tmp_path: Path) -> None:
    res = run_plan(tmp_path, paper_405b(), "-o", "json", "--documents", "1000", "--doc-tokens", "500")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    ft = out["stages"][0]
    assert ft["tokens"] == 500_000 and ft["problems"] == [] and out["problems"] == []
    assert ft["total_gib"] == pytest.approx(sum(ft["memory_gib"].values()), abs=0.1)


def test_plan_reads_local_documents_to_count_them(tmp_path: Path) -> None:
    data = paper_405b(documents="builtin:demo_documents", max_doc_tokens=200)
    p = plan_experiment(parse_experiment(data))
    import re

    m = re.fullmatch(r"(\d+) documents of ~(\d+) tokens read from builtin:demo_documents \((\d+) over the limits\)",
                     p.stages[0].notes[0])
    assert m, p.stages[0].notes[0]
    kept, mean, over = (int(g) for g in m.groups())
    assert kept + over == 80 and 0 < kept < 80 and mean <= 200
    assert p.stages[0].tokens == pytest.approx(kept * mean, rel=0.01)


def test_plan_never_imports_torch(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(paper_405b()))
    code = (
        "import sys, json\n"
        "from click.testing import CliRunner\n"
        "from alignfake.finetune.commands import plan\n"
        f"r = CliRunner().invoke(plan, [{str(spec)!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'peft', 'accelerate'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
