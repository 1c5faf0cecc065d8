"""One rank of `bench.dist`'s memory figure (started by torchrun): the ~110M Llama trained for a few
steps under `--mode` (ddp | zero2 | zero3) through `stages.runtime.process_group.Engine`; rank 0 prints
`RESULT {json}` with every rank's parameter and optimizer bytes, step time and peak anonymous RSS."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.peft_methods import PeakSampler, batches, reset_peak
from stages.runtime import process_group as dist
from stages.runtime.process_group import Engine, state_bytes
from stages.settings.distributed import DistributedConfig

ZERO = {
    "zero2": {"zero_optimization": {"stage": 2}},
    "zero3": {"zero_optimization": {"stage": 3}},
    "zero3_bf16": {"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}},  # DeepSpeed's mixed precision
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--mode", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)  # global
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mode = args.mode.removesuffix("_bf16")
    cfg = DistributedConfig(mode=mode, nproc_per_node=dist.world_size(), deepspeed=ZERO.get(args.mode, {}))
    dist.init(cfg)
    tok = AutoTokenizer.from_pretrained(args.model)
    rows = batches(tok, "causal_lm", args.steps, args.batch, args.seq)
    mine = dist.share(args.batch)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    reset_peak()
    sampler = PeakSampler()
    engine = Engine(model, opt, cfg, micro_batch=args.batch // dist.world_size(), clip=1.0)
    times, losses = [], []
    for step in range(args.steps):
        b = {k: v[mine] for k, v in rows[step].items()}
        t0 = time.perf_counter()
        loss = engine(**b, labels=b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)).loss
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - t0)
        losses.append(dist.mean(loss.detach().reshape(1)))
    anon, _ = sampler.stop()
    held = state_bytes(engine.base, engine.opt)
    mine_row = {"rank": dist.rank(), **held, "peak_anon_mb": anon, "step_s": sum(times[1:]) / max(1, len(times) - 1)}
    everyone = dist.gather([mine_row])
    if dist.is_main():
        params = sum(p.numel() for p in model.parameters()) if not cfg.zero == 3 else None
        print("RESULT " + json.dumps({"mode": args.mode, "ranks": everyone, "losses": losses, "params": params}))


if __name__ == "__main__":
    main()
