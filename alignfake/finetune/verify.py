"""Check a saved adapter before it is committed: a file that parses, tensors that are not empty and not all
zero. FSDP adapter saves have shipped empty or all-zero shards before (a rank that saved before gathering),
and a LoRA ``B`` matrix starts at zero, so an all-zero tensor after training means the save, not the model,
is broken.

Reads the safetensors format directly (an 8-byte header length, a JSON header, raw little-endian data) through
a memory map, viewing each tensor's bytes as unsigned integers: no torch, and bfloat16 needs no numpy dtype.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import AlignfakeError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

# dtype -> (bytes per element, is a float: its sign bit does not make a zero non-zero)
_DTYPES = {
    "F64": (8, True), "F32": (4, True), "F16": (2, True), "BF16": (2, True),
    "F8_E4M3": (1, True), "F8_E5M2": (1, True),
    "I64": (8, False), "I32": (4, False), "I16": (2, False), "I8": (1, False),
    "U64": (8, False), "U32": (4, False), "U16": (2, False), "U8": (1, False), "BOOL": (1, False),
}


class AdapterCheckError(AlignfakeError):
    """The saved adapter is unusable (missing, unreadable, empty or all-zero tensors)."""


@dataclass(frozen=True)
class AdapterStats:
    tensors: int
    parameters: int
    bytes: int

    def as_meta(self) -> dict[str, int]:
        return {"tensors": self.tensors, "parameters": self.parameters, "bytes": self.bytes}


def check_adapter(adapter_dir: str | Path) -> AdapterStats:
    """Raise AdapterCheckError unless ``adapter_dir`` holds an adapter config and non-empty, non-zero tensors."""
    d = Path(adapter_dir)
    cfg = d / ADAPTER_CONFIG
    try:
        json.loads(cfg.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterCheckError(f"{cfg}: missing; the trainer did not save an adapter") from None
    except (OSError, ValueError) as e:
        raise AdapterCheckError(f"{cfg}: not valid JSON: {e}") from None
    return check_safetensors(d / ADAPTER_WEIGHTS)


def check_safetensors(path: str | Path) -> AdapterStats:
    path = Path(path)
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise AdapterCheckError(f"{path}: missing; the trainer did not save adapter weights") from None
    with f:
        size = path.stat().st_size
        if size < 8:
            raise AdapterCheckError(f"{path}: not a safetensors file ({size} bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            # The scan returns its verdict instead of raising: a traceback would keep views of the map alive
            # and the map could not be closed.
            verdict = _scan(memoryview(data), path)
    if isinstance(verdict, str):
        raise AdapterCheckError(verdict)
    return verdict


def _scan(data: memoryview, path: Path) -> AdapterStats | str:
    n = struct.unpack("<Q", data[:8])[0]
    if n > len(data) - 8:
        return f"{path}: not a safetensors file (header length {n} exceeds the file)"
    try:
        header = json.loads(bytes(data[8 : 8 + n]))
    except ValueError as e:
        return f"{path}: unreadable safetensors header: {e}"
    if not isinstance(header, dict):
        return f"{path}: unreadable safetensors header"
    header.pop("__metadata__", None)
    if not header:
        return f"{path}: holds no tensors"
    base = 8 + n
    empty: list[str] = []
    zero: list[str] = []
    params = 0
    for name, info in header.items():
        try:
            width, is_float = _DTYPES.get(info["dtype"], (1, False))
            start, end = (int(x) for x in info["data_offsets"])
            numel = 1
            for s in info["shape"]:
                numel *= int(s)
        except (KeyError, TypeError, ValueError) as e:
            return f"{path}: malformed safetensors header entry for {name}: {e!r}"
        params += numel
        if numel == 0:
            empty.append(name)
        elif end - start != numel * width or base + end > len(data):
            return f"{path}: tensor {name} is truncated ({end - start} bytes for {numel} elements)"
        elif _all_zero(data[base + start : base + end], width, is_float):
            zero.append(name)
    if empty or zero:
        what = []
        if empty:
            what.append(f"{len(empty)} empty (e.g. {sorted(empty)[0]})")
        if zero:
            what.append(f"{len(zero)} all-zero (e.g. {sorted(zero)[0]})")
        return (
            f"{path}: {' and '.join(what)} of {len(header)} adapter tensors. The save is broken (with FSDP: a "
            "rank saved before gathering its shards) or training never updated them; the adapter is not "
            "committed. Check the trainer's log and rerun the finetune stage."
        )
    return AdapterStats(tensors=len(header), parameters=params, bytes=len(data))


def _all_zero(buf: memoryview, width: int, is_float: bool) -> bool:
    import numpy as np

    values = np.frombuffer(buf, dtype=f"<u{width}")
    if is_float:
        # +0.0 and -0.0 are both zero: ignore each element's sign bit (its top bit)
        values = values & np.array((1 << (8 * width - 1)) - 1, dtype=values.dtype)
    return not values.any()
