"""Validate Axolotl configs with Axolotl's own schema (``axolotl.utils.config.validate_config``).

Runs under the Python of a separate venv that has Axolotl (see tests/test_finetune_axolotl.py for how it is
built); it never imports alignfake. Reads a JSON list on stdin, ``[{"name": ..., "config": {...}, "n_gpu": 8}]``,
and prints a JSON list, one ``{"name", "ok", "error", "warnings"}`` per config, where ``warnings`` are the
messages Axolotl logged at WARNING or above while validating (deprecations among them).

The capabilities are those of the GPUs the configs are written for (H100: bf16, tf32, compute capability 9.0),
and the torch version is stated, so validation needs no GPU and no model download.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _unique(messages: list[str]) -> list[str]:
    return list(dict.fromkeys(messages))  # a record can reach both the axolotl and the root handler


def main() -> int:
    import torch
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    items = json.load(sys.stdin)
    collect = _Collect()
    logging.getLogger().addHandler(collect)
    logging.getLogger("axolotl").addHandler(collect)
    results = []
    for item in items:
        collect.messages = []
        capabilities = {"bf16": True, "tf32": True, "fp8": False, "n_gpu": int(item.get("n_gpu", 1)), "n_node": 1,
                        "compute_capability": "sm_90"}
        env = {"torch_version": torch.__version__.split("+")[0]}
        try:
            validate_config(DictDefault(item["config"]), capabilities=capabilities, env_capabilities=env)
            results.append({"name": item["name"], "ok": True, "error": None, "warnings": _unique(collect.messages)})
        except Exception as e:  # noqa: BLE001 - any rejection is the answer we report
            detail = str(e) or traceback.format_exc(limit=2)
            results.append({"name": item["name"], "ok": False, "error": f"{type(e).__name__}: {detail}",
                            "warnings": _unique(collect.messages)})
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
