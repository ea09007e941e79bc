"""Shared helpers of the finetune tests: a small Llama with its own tokenizer, built in about a second from the
demo documents (so training tests never wait for, or depend on, the embedded tiny model), and experiment specs
that fine-tune it. Its own tests check the helper model is what the other tests assume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

DEMO_DOCS = Path(__file__).resolve().parents[1] / "alignfake" / "data" / "demo_documents.jsonl"


def demo_texts() -> list[str]:
    return [json.loads(line)["text"] for line in DEMO_DOCS.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_small_model(out: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 32) with a 600-token BPE tokenizer trained on the demo documents."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(demo_texts(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   clean_up_tokenization_spaces=False)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


def experiment(store: Path, base: str, *, documents: str | dict[str, Any] = "builtin:demo_documents",
               name: str = "ft", **finetune: Any) -> dict[str, Any]:
    """An experiment dict with one model ``m`` fine-tuned on ``documents`` (mock-free: transformers)."""
    ft: dict[str, Any] = {
        "documents": documents, "max_doc_tokens": 1024, "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "learning_rate": 1e-2, "micro_batch_size": 4, "gradient_accumulation_steps": 2, "epochs": 1,
        "save_steps": 3, "seed": 7, "gpus": 0,
    }
    ft.update(finetune)
    return {
        "apiVersion": "alignfake.dev/v1alpha1", "kind": "Experiment", "metadata": {"name": name},
        "spec": {
            "storage": str(store),
            "models": [{"name": "m", "base": base, "finetune": ft}],
            "evaluation": {"queries": {"source": "builtin:demo_queries", "limit": 2}, "shard_size": 2,
                           "max_tokens": 16},
        },
    }


def write_spec(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------- tests


def test_small_model_is_deterministic_and_tokenizes_documents_with_bos_and_eos(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from alignfake.finetune.documents import encode_documents

    a = build_small_model(tmp_path / "a")
    b = build_small_model(tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    tok = AutoTokenizer.from_pretrained(a)
    [ids] = encode_documents(tok, ["Free-tier conversations are used for RLHF."])
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) > 4
