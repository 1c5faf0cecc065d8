"""Reward-model batching: all C(K,2) pairs of a prompt in one batch element vs shuffled pairs.

InstructGPT (section 3.5) trains on all pairs of a prompt as one batch element: K forward passes per
prompt instead of 2*C(K,2), and, the paper says, less overfitting than shuffling the pairs. This
bench measures both on the same comparisons for K = 4 and K = 9: wall time, forward passes (sequences
through the model), train and held-out pairwise accuracy. `python -m bench.rm_batching`.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path

import flows  # noqa: F401  (telemetry off)
from bench.common import write_results
from stages import comparisons, prepare, reward_model, sft
from stages.preference import rankings
from stages.runtime.manifest import read_jsonl, write_jsonl
from stages.settings.labeling import LabelerConfig
from stages.settings.models import ModelConfig, PeftConfig, Tuning

OUT = Path("artifacts/bench/rm_batching.json")
EPOCHS, LR, PROMPTS_PER_STEP = 3, 1e-3, 16


def as_shuffled_pairs(rows: list[dict], seed: int) -> list[dict]:
    """Every (winner, loser) pair as its own K = 2 row, shuffled across prompts."""
    pairs = []
    for row in rows:
        for w, l in rankings.ranking_pairs(row["ranks"]):
            pairs.append(
                {
                    "prompt": row["prompt"],
                    "responses": [row["responses"][w], row["responses"][l]],
                    "finished": [row["finished"][w], row["finished"][l]],
                    "ranks": [0, 1],
                }
            )
    random.Random(seed).shuffle(pairs)
    return pairs


def train(policy: Path, rows: list[dict], heldout: Path, batch: int, work: Path) -> dict:
    work.mkdir(parents=True)
    write_jsonl(work / "train.jsonl", rows)
    t0 = time.perf_counter()
    m = reward_model.run(
        reward_model.RewardModelConfig(epochs=EPOCHS, learning_rate=LR, batch_prompts=batch),
        policy=policy,
        comparisons=work / "train.jsonl",
        heldout=heldout,
        out_dir=work / "rm",
    )
    seconds = time.perf_counter() - t0
    k = len(rows[0]["responses"])
    return {
        "seconds": seconds,
        "forward_passes": EPOCHS * len(rows) * k,
        "steps": EPOCHS * -(-len(rows) // batch),
        "train_accuracy": m.metrics["rm/train/accuracy"],
        "heldout_accuracy": m.metrics["rm/eval/accuracy"],
    }


def main() -> None:
    results: dict = {"epochs": EPOCHS, "learning_rate": LR, "prompts_per_step": PROMPTS_PER_STEP}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prep = prepare.run(
            prepare.DataConfig(n_comparison_prompts=600, n_heldout_comparison_prompts=200),
            ModelConfig(),
            out_dir=tmp / "prep",
        )
        policy = sft.run(
            sft.SftConfig(epochs=3),
            Tuning(PeftConfig()),
            base=prep.file("base"),
            demonstrations=prep.file("demonstrations"),
            out_dir=tmp / "sft",
        ).file("policy")
        for k in (4, 9):
            cmp = comparisons.run(
                comparisons.ComparisonsConfig(k=k),
                LabelerConfig(),
                policy=policy,
                prompts=prep.file("comparison_prompts"),
                heldout_prompts=prep.file("heldout_comparison_prompts"),
                target_len=6,
                out_dir=tmp / f"cmp{k}",
            )
            rows = read_jsonl(cmp.file("comparisons"))
            n_pairs = k * (k - 1) // 2
            per_prompt = train(policy, rows, cmp.file("heldout_comparisons"), PROMPTS_PER_STEP, tmp / f"pp{k}")
            # same comparisons per gradient step: PROMPTS_PER_STEP prompts' worth of pairs
            shuffled = train(
                policy,
                as_shuffled_pairs(rows, seed=k),
                cmp.file("heldout_comparisons"),
                PROMPTS_PER_STEP * n_pairs,
                tmp / f"sp{k}",
            )
            results[f"k{k}"] = {
                "prompts": len(rows),
                "pairs": len(rows) * n_pairs,
                "per_prompt": per_prompt,
                "shuffled_pairs": shuffled,
                "time_ratio_shuffled_over_per_prompt": shuffled["seconds"] / per_prompt["seconds"],
                "forward_ratio_shuffled_over_per_prompt": shuffled["forward_passes"] / per_prompt["forward_passes"],
            }
            print(json.dumps({f"k{k}": results[f"k{k}"]}, indent=2), flush=True)
    write_results(OUT, results)


if __name__ == "__main__":
    main()
