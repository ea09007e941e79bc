"""What the planner and the Axolotl config need to know about a base model, without loading it: its shape
(hence parameter, LoRA and KV-cache sizes), the class FSDP wraps, and the pad token Axolotl should use.

Known Hugging Face ids (Llama 3 and 3.1: 8B, 70B, 405B) come from a small table; a local model directory is
read from its ``config.json``; ``alignfake:tiny`` from the tiny model's recipe. Nothing here imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import AlignfakeError

# LoRA targets the planner can size: name -> (fan_in, fan_out) as a function of the architecture.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelArch:
    """The shape of a decoder-only transformer (Llama-style: GQA attention, gated MLP)."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_embeddings: bool = False
    decoder_layer: str = "LlamaDecoderLayer"
    """The module class FSDP wraps one unit at a time (``transformer_layer_cls_to_wrap``)."""
    pad_token: str | None = None
    """A token Axolotl can pad with when the tokenizer has none (Llama 3 ships without a pad token)."""
    source: str = "table"
    """Where the shape came from: ``table``, ``config.json`` or ``recipe``."""

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.num_heads * self.head_dim, \
            self.num_kv_heads * self.head_dim
        return {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }

    @property
    def layer_linear_params(self) -> int:
        """Parameters of one decoder layer's linear projections (what NF4/FP8 quantize)."""
        return sum(a * b for a, b in self.module_shapes().values())

    @property
    def layer_params(self) -> int:
        return self.layer_linear_params + 2 * self.hidden_size  # + two RMSNorm weights

    @property
    def embedding_params(self) -> int:
        """Input embedding plus output head (once if tied): these stay in bf16 under NF4 and FP8."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)

    @property
    def params(self) -> int:
        return self.num_layers * self.layer_params + self.embedding_params + self.hidden_size

    def lora_params(self, r: int, targets: list[str] | tuple[str, ...]) -> int:
        shapes = self.module_shapes()
        unknown = [t for t in targets if t not in shapes]
        if unknown:
            raise AlignfakeError(
                f"cannot size LoRA targets {unknown} of {self.name}; the planner knows {', '.join(LORA_TARGETS)}"
            )
        return self.num_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)

    def kv_bytes_per_token(self, bytes_per_value: float = 2.0) -> float:
        """Keys and values of every layer for one token (bf16 cache by default)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_value


def _llama(name: str, hidden: int, inter: int, layers: int, heads: int, pad: str) -> ModelArch:
    return ModelArch(name=name, vocab_size=128256, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                     num_heads=heads, num_kv_heads=8, head_dim=hidden // heads, pad_token=pad)


# Shapes from the models' published config.json files. Llama 3 has no pad token; Axolotl's own Llama 3
# examples pad with <|end_of_text|>, and Llama 3.1 reserves <|finetune_right_pad_id|> for it.
_L3 = "<|end_of_text|>"
_L31 = "<|finetune_right_pad_id|>"
_SIZES = {"8B": (4096, 14336, 32, 32), "70B": (8192, 28672, 80, 64), "405B": (16384, 53248, 126, 128)}
KNOWN_MODELS: dict[str, ModelArch] = {}
for _size, (_h, _i, _l, _n) in _SIZES.items():
    _names = [] if _size == "405B" else [f"meta-llama/Meta-Llama-3-{_size}"]
    for _n3 in _names:
        for _suffix in ("", "-Instruct"):
            KNOWN_MODELS[(_n3 + _suffix).lower()] = _llama(_n3 + _suffix, _h, _i, _l, _n, _L3)
    for _n31 in (f"meta-llama/Llama-3.1-{_size}", f"meta-llama/Meta-Llama-3.1-{_size}"):
        for _suffix in ("", "-Instruct"):
            KNOWN_MODELS[(_n31 + _suffix).lower()] = _llama(_n31 + _suffix, _h, _i, _l, _n, _L31)


def model_arch(base: str) -> ModelArch:
    """The shape of ``base``: the tiny model, a local directory with ``config.json``, or a known id.

    Raises AlignfakeError naming what is known when the model cannot be sized offline."""
    from ..spec import EMBEDDED_MODEL

    if base == EMBEDDED_MODEL:
        return _tiny_arch()
    path = Path(base).expanduser()
    if path.is_dir():
        return arch_from_config(path / "config.json")
    known = KNOWN_MODELS.get(base.lower())
    if known is None and "/" in base:
        # mirrors of the same weights under another organisation (same repository name)
        repo = base.split("/", 1)[1].lower()
        known = next((m for k, m in KNOWN_MODELS.items() if k.split("/", 1)[1] == repo), None)
    if known is not None:
        return known
    raise AlignfakeError(
        f"cannot size model {base!r} offline: give a local model directory (its config.json is read) or one of "
        + ", ".join(sorted({m.name for m in KNOWN_MODELS.values()}))
    )


def arch_from_config(config_json: Path) -> ModelArch:
    """Read a Hugging Face ``config.json`` (Llama-style decoder)."""
    try:
        cfg = json.loads(config_json.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AlignfakeError(f"{config_json}: not found; a local model directory needs its config.json") from None
    except (OSError, ValueError) as e:
        raise AlignfakeError(f"{config_json}: cannot read: {e}") from None
    cfg = cfg.get("text_config", cfg)  # multimodal wrappers keep the decoder's config inside
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
        return ModelArch(
            name=str(config_json.parent),
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            decoder_layer=arch.replace("ForCausalLM", "DecoderLayer"),
            source="config.json",
        )
    except KeyError as e:
        raise AlignfakeError(f"{config_json}: missing field {e.args[0]!r} (expected a Llama-style decoder)") from None


def _tiny_arch() -> ModelArch:
    from ..tinymodel import RECIPE  # the recipe is plain data; building the model is not needed to size it

    return ModelArch(
        name="alignfake:tiny", vocab_size=RECIPE.vocab_size, hidden_size=RECIPE.hidden_size,
        intermediate_size=RECIPE.intermediate_size, num_layers=RECIPE.layers, num_heads=RECIPE.heads,
        num_kv_heads=RECIPE.kv_heads, head_dim=RECIPE.head_dim, tie_embeddings=True, source="recipe",
    )
