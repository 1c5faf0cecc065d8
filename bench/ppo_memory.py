"""PPO memory and rollout speed on a ~110M-parameter random-init Llama (weights dominate memory).

1. Peak RSS of a PPO run (2 updates) in each layout, each in its own process:
   `full_copies` (policy, reference, value, reward as four models) against `shared_base` (one base,
   LoRA policy and value adapters, reference = adapters disabled, separate frozen reward model).
2. Tokens per second of PPO's rollout sampling (`stages.models.modeling.sample`) against a plain
   `model.generate` on the same batch, alternated over repeats.
Writes artifacts/bench/ppo_memory.json. `python -m bench.ppo_memory`.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import flows  # noqa: F401  (telemetry off)
from bench.common import run_child, write_results

OUT = Path("artifacts/bench/ppo_memory.json")
CHILD = """
import json, resource, sys, time
from pathlib import Path
import flows
from stages import ppo
from stages.settings.models import PeftConfig
from stages.settings.models import Tuning
root, layout = Path(sys.argv[1]), sys.argv[2]
cfg = ppo.PpoConfig(updates=2, rollouts_per_update=8, minibatch_size=4, max_new_tokens=8, layout=layout)
t = time.perf_counter()
method = "full" if layout == "full_copies" else "lora"  # full copies train in full, the shared base its adapters
ppo.run(cfg, Tuning(PeftConfig(method, r=16, alpha=32)), policy=root / "base", reward_model=root / "rm",
        normalization=root / "normalization.json", prompts=root / "prompts.jsonl", out_dir=root / ("out-" + layout))
print("RESULT " + json.dumps({"seconds": time.perf_counter() - t,
                              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def build(root: Path) -> int:
    from stages.data import task
    from stages.models.modeling import build_tiny_llama, load_scalar_model
    from stages.prepare import build_tokenizer
    from stages.runtime.manifest import write_jsonl
    from stages.settings.models import ModelConfig

    tok = build_tokenizer([" ".join(task.vocabulary())])
    cfg = ModelConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    model = build_tiny_llama(cfg, tok, seed=0)
    model.save_pretrained(root / "base", safe_serialization=True)
    tok.save_pretrained(root / "base")
    rm = load_scalar_model(root / "base")
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(root / "rm", safe_serialization=True)
    tok.save_pretrained(root / "rm")
    (root / "normalization.json").write_text(json.dumps({"bias": 0.0}))
    write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in task.make_prompts(64, seed=1)])
    del rm
    return sum(p.numel() for p in model.parameters())


def rollout_speed(root: Path, repeats: int = 3) -> dict:
    import torch

    from stages.data import task
    from stages.models.modeling import encode_queries, load_causal_lm, load_tokenizer, sample

    tok, model = load_tokenizer(root / "base"), load_causal_lm(root / "base").eval()
    prompts = task.make_prompts(16, seed=2)
    query, mask = encode_queries(tok, prompts)
    times = {"alignflow_rollout": [], "plain_generate": []}
    tokens = {}
    for _ in range(repeats):
        t = time.perf_counter()
        r = sample(model, tok, prompts, max_new_tokens=32, generator_seed=0)
        times["alignflow_rollout"].append(time.perf_counter() - t)
        tokens["alignflow_rollout"] = int(r.response_mask.sum())
        torch.manual_seed(0)
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                input_ids=query,
                attention_mask=mask,
                do_sample=True,
                top_k=0,
                max_new_tokens=32,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        times["plain_generate"].append(time.perf_counter() - t)
        gen = out[:, query.shape[1] :]
        ended = (gen == tok.eos_token_id).cumsum(1) - (gen == tok.eos_token_id).long()
        tokens["plain_generate"] = int((ended == 0).sum())
    best = {k: min(v) for k, v in times.items()}
    tps = {k: tokens[k] / best[k] for k in best}
    return {
        "seconds_best_of": best,
        "tokens": tokens,
        "tokens_per_second": tps,
        "ratio_rollout_over_generate": tps["alignflow_rollout"] / tps["plain_generate"],
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        params = build(root)
        results: dict = {"params": params}
        for layout in ("full_copies", "shared_base"):
            results[layout] = run_child([sys.executable, "-c", CHILD, str(root), layout], layout)
            print(layout, results[layout], flush=True)
        results["peak_rss_ratio_shared_over_full"] = (
            results["shared_base"]["peak_rss_mb"] / results["full_copies"]["peak_rss_mb"]
        )
        results["rollout"] = rollout_speed(root)
        results["bench_process_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    write_results(OUT, results, echo=True)


if __name__ == "__main__":
    main()
