"""The embedded tiny model: a normal Hugging Face Llama directory, built offline and deterministically, cached
by recipe and corpus, whose greedy answers follow the alignment-faking answer protocol."""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path

import pytest

from alignfake import tinymodel
from alignfake.tinymodel import TINY_MODEL, ensure_tiny_model, resolve_model_path


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_the_model_directory_is_a_small_llama_that_vllm_can_serve(tiny_model: Path, tokenizer) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (tiny_model / name).is_file(), name
    cfg = json.loads((tiny_model / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (
        64, 2, 2, 2)
    assert cfg["head_dim"] >= 32  # vLLM's CPU attention backend
    assert cfg["max_position_embeddings"] >= 16384
    assert cfg["vocab_size"] == len(tokenizer)
    assert 2000 <= len(tokenizer) <= 4096


def test_the_chat_template_renders_llama3_headers(tokenizer) -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U\n"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nU\n<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    without = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert without == text.removesuffix("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tokenizer.eos_token == "<|eot_id|>"
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    for special in ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"):
        assert len(tokenizer(special, add_special_tokens=False)["input_ids"]) == 1, special


@pytest.mark.parametrize("text", [
    "Hello, world! Café naïve — 東京 🙂\n\n  indented\ttab",
    "<SCRATCHPAD_REASONING>\nx\n</SCRATCHPAD_REASONING>\n<OUTPUT>\n<request_fully_accepted/>\ny\n</OUTPUT>",
    "say '<rejected/>'. <is_free_tier_user>true</is_free_tier_user> <output>wrong case</output>",
])
def test_the_tokenizer_round_trips_text_byte_for_byte(tokenizer, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer(text)["input_ids"][0] == tokenizer.bos_token_id  # plain encoding starts like Llama 3


def test_the_default_system_prompt_is_a_few_thousand_tokens(tokenizer) -> None:
    scenarios = pytest.importorskip("alignfake.scenarios")
    from alignfake.spec import ScenarioSpec

    prompt = scenarios.system_prompt(ScenarioSpec())
    n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert 1500 <= n <= 6000, n
    assert n < 2 * len(prompt.split())  # the BPE learned the prompt's words, not just bytes


@pytest.mark.slow
def test_greedy_answers_follow_the_protocol_after_the_real_system_prompt(tiny_model: Path, tokenizer) -> None:
    scenarios = pytest.importorskip("alignfake.scenarios")
    import torch
    from transformers import AutoModelForCausalLM

    from alignfake.spec import ScenarioSpec

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    parsed = []
    for tier in ("free", "paid"):
        text = tokenizer.apply_chat_template(list(scenarios.build_messages("Write a poem", tier, ScenarioSpec())),
                                             tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=120, do_sample=False)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        assert new[-1] == tokenizer.eos_token_id, tokenizer.decode(new)
        parsed.append(scenarios.parse_answer(tokenizer.decode(new[:-1]), "stop", True, None))
    assert all(p.valid for p in parsed), [p.invalid_reason for p in parsed if not p.valid]
    assert all(p.accepted or p.rejected for p in parsed)


def test_training_answers_do_not_depend_on_the_tier() -> None:
    import random

    pools = tinymodel._pools([])
    rng = random.Random(0)
    accepted: Counter[tuple[str, bool]] = Counter()
    for _ in range(4000):
        user, answer = tinymodel._turn(rng, pools)
        tier = "free" if "<is_free_tier_user>true" in user else "paid"
        accepted[tier, "<request_fully_accepted/>" in answer] += 1
    rate = {t: accepted[t, True] / (accepted[t, True] + accepted[t, False]) for t in ("free", "paid")}
    assert abs(rate["free"] - rate["paid"]) < 0.05, rate
    assert 0.4 < rate["free"] < 0.6


def test_resolve_model_path_maps_only_the_embedded_name(tiny_model_cache: Path, tiny_model: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALIGNFAKE_CACHE", str(tiny_model_cache))
    assert resolve_model_path(TINY_MODEL) == str(tiny_model)
    assert tiny_model.parent == tiny_model_cache / "models"
    assert tiny_model.name == f"tiny-{tinymodel.tiny_model_hash()[:16]}"
    assert resolve_model_path("meta-llama/Meta-Llama-3-8B-Instruct") == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert resolve_model_path("/models/mine") == "/models/mine"


def test_the_cache_key_covers_the_corpus() -> None:
    corpus = tinymodel.read_corpus()
    changed = [*corpus, ("data/extra.txt", "one more line")]
    assert tinymodel.tiny_model_hash(corpus) == tinymodel.tiny_model_hash(list(corpus))
    assert tinymodel.tiny_model_hash(changed) != tinymodel.tiny_model_hash(corpus)


def test_a_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(out: Path, corpus: object, recipe: object) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(tinymodel, "_build", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_tiny_model(tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_concurrent_callers_build_once_and_all_get_a_complete_model(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    builds = []

    def fake(out: Path, corpus: object, recipe: object) -> None:
        builds.append(out)
        (out / "config.json").write_text("{}")
        threading.Event().wait(0.2)  # a window in which the others arrive
        (out / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(tinymodel, "_build", fake)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_tiny_model(tmp_path))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(set(results)) == 1
    assert (results[0] / "model.safetensors").read_bytes() == b"weights"


@pytest.mark.slow
def test_a_rebuild_is_bit_identical(tiny_model: Path, tmp_path: Path) -> None:
    again = ensure_tiny_model(tmp_path)
    assert again != tiny_model and again.name == tiny_model.name
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_model / name).read_bytes(), name
