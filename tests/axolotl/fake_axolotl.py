"""A stand-in for ``axolotl train CONFIG --launcher torchrun -- --nproc_per_node=N`` for the stage tests on
machines without GPUs: it reads the generated config as Axolotl would (documents, batch sizes, epochs,
``save_steps``, ``output_dir``, resume), "trains" by writing HF-Trainer-shaped ``checkpoint-N`` directories
every ``save_steps`` and at the last step (adapter weights, optimizer shards, ``trainer_state.json`` last), and
finally the adapter in ``output_dir``.

Environment knobs for the tests:
  FAKE_AXOLOTL_LOG         append one JSON line per invocation (argv, config, start step) to this file
  FAKE_AXOLOTL_DIE_AFTER   SIGKILL itself right after writing the checkpoint of this step
  FAKE_AXOLOTL_ZERO        write an all-zero final adapter (what a broken FSDP save looks like)
  FAKE_AXOLOTL_STEP_SLEEP  seconds per step (default 0.05)
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from safetensors.numpy import save_file


def adapter(step: int, cfg: dict, zero: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    r = cfg["lora_r"]
    out = {}
    for name in cfg["lora_target_modules"]:
        for kind, shape in (("lora_A", (r, 16)), ("lora_B", (16, r))):
            key = f"base_model.model.model.layers.0.self_attn.{name}.{kind}.weight"
            out[key] = np.zeros(shape, np.float32) if zero else rng.standard_normal(shape).astype(np.float32)
    return out


def main() -> int:
    args = sys.argv[1:]
    assert args[0] == "train", args
    config = Path(args[1])
    cfg = yaml.safe_load(config.read_text())
    nproc = int(next(a.split("=", 1)[1] for a in args if a.startswith("--nproc_per_node=")))
    docs = Path(cfg["datasets"][0]["path"]).read_text().splitlines()
    per_epoch = math.ceil(len(docs) / (cfg["micro_batch_size"] * cfg["gradient_accumulation_steps"] * nproc))
    total = per_epoch * int(cfg["num_epochs"])
    out = Path(cfg["output_dir"])
    start = 0
    resume = cfg.get("resume_from_checkpoint")
    if resume is None and cfg.get("auto_resume_from_checkpoints"):
        found = sorted((int(m.group(1)), p) for p in out.glob("checkpoint-*")
                       if (m := re.match(r"checkpoint-(\d+)$", p.name)))
        resume = str(found[-1][1]) if found else None
    if resume:
        start = json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"]
        assert (Path(resume) / "optimizer_0" / "__0_0.distcp").read_bytes() == f"optimizer {start}".encode()
    if os.environ.get("FAKE_AXOLOTL_LOG"):
        with open(os.environ["FAKE_AXOLOTL_LOG"], "a") as f:
            f.write(json.dumps({"argv": args, "config": str(config), "start": start, "total": total}) + "\n")
    die_after = int(os.environ.get("FAKE_AXOLOTL_DIE_AFTER", "0"))
    for step in range(start + 1, total + 1):
        time.sleep(float(os.environ.get("FAKE_AXOLOTL_STEP_SLEEP", "0.05")))
        if step % cfg["save_steps"] == 0 or step == total:  # the HF Trainer also saves at the last step
            d = out / f"checkpoint-{step}"
            (d / "optimizer_0").mkdir(parents=True)
            save_file(adapter(step, cfg), str(d / "adapter_model.safetensors"))
            (d / "optimizer_0" / "__0_0.distcp").write_bytes(f"optimizer {step}".encode())
            (d / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": total}))
            if step == die_after:
                os.kill(os.getpid(), signal.SIGKILL)
    save_file(adapter(total, cfg, zero=bool(os.environ.get("FAKE_AXOLOTL_ZERO"))),
              str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": cfg["lora_r"], "lora_alpha": cfg["lora_alpha"],
        "target_modules": cfg["lora_target_modules"], "base_model_name_or_path": cfg["base_model"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
