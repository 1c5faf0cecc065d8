"""Comparisons stage: sample K responses per prompt from the SFT policy and have a labeler rank them.

InstructGPT's labelers ranked K = 4 to 9 responses per prompt; here K defaults to 4 and the labeler
is the simulated one (`stages/labeling/labelers.py`). Writes `comparisons.jsonl` (reward-model training) and
`heldout_comparisons.jsonl` (reward-model evaluation), rows
`{"prompt", "responses": [K], "finished": [K], "ranks": [K]}` (0 = best, ties share a rank), the
data worker's `rankings` schema. The AI labeler (`labeler=ai`, RLAIF) adds `"prefs"`, the (K, K)
soft preferences P(i > j) that `stage.reward_model.targets=soft` distils, and the labeler's
position consistency goes to the metrics.

Alone: `python -m flows.align pipeline.stop_after=comparisons`.
"""

from __future__ import annotations

from pathlib import Path

from stages.data.tokens import SamplingBudget, fit_prompt_file, resolve_sampling
from stages.labeling.labelers import make_labeler
from stages.models.compute import compute_dtype, pick_device
from stages.models.modeling import decode_responses, load_causal_lm, load_tokenizer, model_context, sample
from stages.runtime.manifest import Manifest, folder_digest, read_jsonl, write_jsonl
from stages.runtime.progress import progress
from stages.runtime.tracking import log_metrics
from stages.settings.labeling import LabelerConfig
from stages.settings.recipe import ComparisonsConfig


def sample_k(
    policy, tokenizer, prompts: list, cfg: ComparisonsConfig, budget: SamplingBudget, precision: str = "fp32"
) -> list[tuple[list[str], list[bool]]]:
    flat = [p for p in prompts for _ in range(cfg.k)]
    texts, finished = [], []
    bar = progress(len(flat), "comparisons: sampling", unit="response")
    for start in range(0, len(flat), cfg.batch_size):
        batch = flat[start : start + cfg.batch_size]
        rollout = sample(
            policy,
            tokenizer,
            batch,
            max_new_tokens=budget.max_new_tokens,
            max_prompt_length=budget.max_prompt_length,
            temperature=cfg.temperature,
            generator_seed=cfg.seed + start,
            precision=precision,
        )
        texts += decode_responses(tokenizer, rollout)
        finished += rollout.finished.tolist()
        bar.update(len(batch))
    bar.close()
    return [(texts[i * cfg.k : (i + 1) * cfg.k], finished[i * cfg.k : (i + 1) * cfg.k]) for i in range(len(prompts))]


def _publish(out_dir: Path, sets: dict[str, list[dict]], metrics: dict[str, float]) -> Manifest:
    """Writes `comparisons.jsonl` and `heldout_comparisons.jsonl`, counts and logs, describes the folder."""
    for name, rows in sets.items():
        write_jsonl(out_dir / f"{name}.jsonl", rows)
        metrics[f"comparisons/{name}/prompts"] = float(len(rows))
    log_metrics(metrics)
    return Manifest(
        stage="comparisons",
        path=str(out_dir),
        digest=folder_digest(out_dir),
        metrics=metrics,
        files={"comparisons": "comparisons.jsonl", "heldout_comparisons": "heldout_comparisons.jsonl"},
    )


def _row_label(label: dict) -> dict:
    return {"ranks": label["ranks"]} | ({"prefs": label["prefs"]} if "prefs" in label else {})


def run(
    cfg: ComparisonsConfig,
    labeler_cfg: LabelerConfig,
    *,
    policy: Path,
    prompts: Path,
    heldout_prompts: Path,
    target_len: int,
    out_dir: Path,
    dataset: Path | None = None,
    dataset_heldout: Path | None = None,
    judge: Path | None = None,
    gold: str | None = "embedded",
    truncation: bool = True,
    max_dropped_fraction: float = 0.0,
    device: str = "auto",
    precision: str = "fp32",
) -> Manifest:
    """With `dataset` (and `dataset_heldout`), comparisons from a file (`data.comparisons`, already
    validated and split by prepare) pass through: nothing is sampled and no labeler is asked.
    `judge`: the `judge` stage's artifact, the AI labeler's model (`labeler=ai`); `device`: where the
    policy samples and the judge runs (`compute.device`), computing in `precision` (`compute.precision`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if dataset is not None:
        if dataset_heldout is None:
            raise ValueError("comparisons: a dataset needs its held-out split too")
        sets = {"comparisons": read_jsonl(dataset), "heldout_comparisons": read_jsonl(dataset_heldout)}
        return _publish(out_dir, sets, {"comparisons/labeler/asked": 0.0})
    where = pick_device(device)
    labeler = make_labeler(
        labeler_cfg, target_len, judge, gold, where, precision
    )  # a missing judge fails before sampling
    tokenizer = load_tokenizer(policy)
    budget = resolve_sampling("comparisons", cfg.max_prompt_length, cfg.max_new_tokens, model_context(policy))
    metrics: dict[str, float] = {}
    kept = {}
    for name, source in (("comparisons", prompts), ("heldout_comparisons", heldout_prompts)):
        kept[name], fitted = fit_prompt_file(
            tokenizer,
            source,
            budget,
            stage="comparisons",
            truncation=truncation,
            max_dropped_fraction=max_dropped_fraction,
        )
        metrics |= fitted.metrics(f"comparisons/{name}")
    model = load_causal_lm(policy, device=where, dtype=compute_dtype(precision))
    sets = {
        name: list(zip(texts, sample_k(model, tokenizer, texts, cfg, budget, precision)))
        for name, texts in kept.items()
    }
    # one labeling request for both sets (one task file for human rankers)
    items = [(p, responses) for pairs in sets.values() for p, (responses, _) in pairs]
    labels = labeler.label_all(items)
    metrics["comparisons/labeler/asked"] = float(labeler.asked)
    if labels and "pairs" in labels[0]:  # the AI labeler judged both orders of every pair
        pairs_judged = sum(label["pairs"] for label in labels)
        metrics["comparisons/labeler/position_consistency"] = sum(l["consistent"] for l in labels) / pairs_judged
    it = iter(labels)
    ranked = {
        name: [
            {"prompt": p, "responses": responses, "finished": finished, **_row_label(next(it))}
            for p, (responses, finished) in pairs
        ]
        for name, pairs in sets.items()
    }
    for name, rows in ranked.items():
        metrics[f"comparisons/{name}/finished"] = sum(sum(r["finished"]) for r in rows) / (len(rows) * cfg.k)
    return _publish(out_dir, ranked, metrics)
