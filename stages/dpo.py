"""DPO stage: Direct Preference Optimization (Rafailov et al. 2023) on the comparisons, no reward model, no RL.

The implicit reward of a response is r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)), with the SFT
policy as the reference. Two ways to use a K-way ranking:

- pairwise (any of trl's `DPOTrainer` loss types: sigmoid, ipo, hinge, robust/cDPO through label
  smoothing, ...): the ranking expands to its C(K,2) (chosen, rejected) pairs, ties dropped;
- `loss_type: plackett_luce` (the DPO paper's appendix A.3, our own loop): the listwise likelihood of
  the whole ranking tau, best first,

      loss = -sum_{k=1}^{K-1} [ r(x, y_tau(k)) - log sum_{j>=k} exp r(x, y_tau(j)) ]

  which equals the sigmoid loss -log sigmoid(r_w - r_l) at K = 2. Ties are broken by response order;
- `loss_type: simpo | orpo` (reference-free: no reference model in training) and `kto` (unpaired
  thumbs: labelled rows, or each ranking split into its better and worse half), our own loop too;
  the losses are in `stages/preference/losses.py`.

The reference is the SFT policy: under LoRA, the same base with the adapters disabled; otherwise an
explicit copy, passed to trl (which would otherwise reload it from `config._name_or_path`). Iterative
(online) DPO (`pipeline.rounds`) runs further rounds from the flow, each a cached comparisons + dpo pair on the current
policy, the reference staying the SFT policy.

Writes the merged policy (a plain `from_pretrained` folder), and reports trl's chosen and rejected
rewards, margins and accuracies, the held-out implicit-reward accuracy, and the KL to SFT per token.

Alone: `python -m flows.align pipeline=dpo pipeline.stop_after=dpo`.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from stages.data.images import row_vision
from stages.data.tokens import default_new_tokens, fit_rows, pack, resolve_budget, row_sources
from stages.models.compute import amp, autocast, compute_dtype, grad_scaler, model_device
from stages.models.modeling import (
    load_causal_lm,
    load_tokenizer,
    mean_token_kl,
    model_context,
    sample,
    save_tokenizer,
    sequence_logprobs,
)
from stages.models.optim import schedule
from stages.models.tuning import device, export, load, optimizer, trainer_setup
from stages.preference.losses import group_loss
from stages.preference.rankings import encode_rankings, preference_pairs
from stages.preference.scorers import implicit_reward_accuracy
from stages.runtime import checkpoints
from stages.runtime import process_group as dist
from stages.runtime.manifest import Manifest, folder_digest, read_jsonl
from stages.runtime.process_group import Engine
from stages.runtime.tracking import TRAINER_ARGS, log_metrics, trainer_callback
from stages.runtime.training import TrainingLoop
from stages.settings.distributed import DistributedConfig
from stages.settings.models import Tuning, shares_base
from stages.settings.recipe import OWN_LOSSES, REFERENCE_FREE, DpoConfig, chosen_learning_rate


def _pretokenized_dpo_trainer():
    """trl's DPOTrainer on rows already tokenized by `stages/data/tokens.py` (trl would re-tokenize the
    text, splitting prompt and response where their joint tokenization diverges)."""
    from trl import DPOTrainer

    class PreTokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return PreTokenizedDPOTrainer


def _train_trl(
    cfg: DpoConfig, tuning: Tuning, model, ref, tokenizer, pairs: list[dict], out_dir: Path, budget, ck, group
):
    from datasets import Dataset
    from trl import DPOConfig

    dataset = Dataset.from_list(pairs)
    saving = {"output_dir": str(out_dir / "trainer"), **checkpoints.trainer_saving(ck, cfg.checkpoint_every)}
    lr = chosen_learning_rate("dpo", cfg.learning_rate, tuning.peft.method)
    train_args, trainer_kwargs = trainer_setup(model, tuning, lr=lr)
    args = DPOConfig(
        num_train_epochs=cfg.epochs,
        learning_rate=lr,
        max_length=budget.max_length,
        beta=cfg.beta,
        loss_type=[cfg.loss_type],
        label_smoothing=cfg.label_smoothing,
        seed=cfg.seed,
        **dist.trainer_args(group, cfg.batch_size, "stage.dpo.batch_size", tuning.compute.device),
        **{**TRAINER_ARGS, **saving, **train_args},
    )
    trainer = _pretokenized_dpo_trainer()(
        model=model,
        ref_model=ref,  # None only with adapters on an unchanged base: the base with the adapters disabled
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[trainer_callback("dpo/train")],
        **trainer_kwargs,
    )
    resume = checkpoints.last_trainer_checkpoint(ck)
    result = trainer.train(resume_from_checkpoint=resume)
    checkpoints.check_finite("dpo", result.training_loss, trainer.state.global_step)
    logs = [h for h in trainer.state.log_history if "rewards/margins" in h]
    last = logs[-1] if logs else {}
    metrics = {
        f"dpo/train/{k}": float(last[k])
        for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
        if k in last
    }
    metrics |= {
        "dpo/steps": float(trainer.state.global_step),
        "dpo/resumed_from": float(checkpoints.trainer_step(resume)),
    }
    return trainer.model, metrics


def _reference_logps(model, ref, packed) -> torch.Tensor:
    with torch.no_grad():
        if ref is not None:
            return sequence_logprobs(ref, packed)
        with model.disable_adapter():
            return sequence_logprobs(model, packed)


def _train_own(cfg: DpoConfig, tuning: Tuning, model, ref, tokenizer, rows: list[dict], encoded: list, ck, distributed):
    """Our loop (Plackett-Luce, SimPO, ORPO, KTO; sigmoid DPO on image-text rows): one batch element per
    prompt with all its K responses, each step's prompts split across the ranks of `distributed` (DDP or
    ZeRO through the `Engine`); `ck`: checkpoints."""
    lr = chosen_learning_rate("dpo", cfg.learning_rate, tuning.peft.method)
    opt = optimizer(model, tuning, lr=lr, weight_decay=0.01)  # torch AdamW default
    per_step = max(1, cfg.batch_size // max(len(r["responses"]) for r in rows))
    steps = max(1, math.ceil(cfg.epochs * math.ceil(len(rows) / per_step)))
    sched = schedule(opt, tuning.optim, steps)
    micro = max(1, per_step // dist.world_size())
    engine = Engine(_SequenceLogps(model), opt, distributed, micro_batch=micro, clip=1.0,
                    scaler=grad_scaler(tuning.compute), precision=tuning.compute.precision)  # fmt: skip
    loop = TrainingLoop("dpo", engine, steps=steps, seed=cfg.seed, sched=sched, checkpoint_dir=ck,
                        checkpoint_every=cfg.checkpoint_every)  # fmt: skip
    loop.resume()  # a killed attempt's last checkpoint: the same pass, from its next batch
    model.train()
    pad, device = tokenizer.pad_token_id, model_device(engine.base)
    for batches in loop.passes(lambda gen: torch.randperm(len(rows), generator=gen, device="cpu").split(per_step)):
        for idx in batches:
            share = idx[dist.share(len(idx))]
            mine = share if len(share) else idx[:1]  # a rank without a share still steps (weight 0)
            batch = [rows[i] for i in mine]
            flat = [(p, r) for i in mine for p, responses in [encoded[i]] for r in responses]
            packed = pack(flat, pad, device)  # once per step, on the policy's device
            lengths = torch.tensor([len(r) for _, r in flat], device=device, dtype=torch.float32)
            with autocast(tuning.compute):  # mixed precision (`compute.precision`); the loss in fp32
                ref_logps = None
                if cfg.loss_type not in REFERENCE_FREE:
                    ref_logps = _reference_logps(engine.base.model, ref, packed).to(device).float()
                logps = engine(packed).float()
            loss = group_loss(cfg, logps, ref_logps, lengths, batch)
            # DDP averages the ranks' gradients: each rank's mean weighs by its share of the prompts
            weight = len(share) * dist.world_size() / len(idx)
            loop.step(loss, reported=_global_mean(loss, len(share)), weight=weight)
    metrics = {"dpo/train/loss": loop.at["loss"], "dpo/steps": float(loop.step_index)}
    return model, metrics | {"dpo/resumed_from": float(loop.resumed_from)}


def _global_mean(loss: torch.Tensor, n: int) -> float | None:
    """The global batch's mean loss over the ranks' `n` prompts each; None in one process (the loss itself)."""
    if not dist.active():
        return None
    shared = dist.all_reduce_sum(torch.tensor([loss.item() * n, float(n)], device="cpu"))
    return (shared[0] / shared[1]).item()


class _SequenceLogps(torch.nn.Module):
    """The policy as the module the engine trains: packed rows -> each row's response log-probability."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, packed) -> torch.Tensor:
        return sequence_logprobs(self.model, packed)


def run(
    cfg: DpoConfig,
    tuning: Tuning,
    *,
    policy: Path,
    reference: Path,
    comparisons: Path,
    heldout: Path,
    out_dir: Path,
    truncation: bool = True,
    max_dropped_fraction: float = 0.0,
    checkpoint_dir: Path | None = None,
    distributed: DistributedConfig | None = None,
) -> Manifest:
    """`policy`: the model to start from (the SFT policy, or the previous round's); `reference`: the SFT
    policy; `checkpoint_dir`: where a killed attempt left its checkpoint. `distributed`: this process is
    one rank of a group; trl's trainer and our own loop (`_train_own`, through the `Engine`) train under
    DDP or DeepSpeed ZeRO (the global batch stays `batch_size`), and rank 0 alone measures the policy."""
    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    rows, held = read_jsonl(comparisons), read_jsonl(heldout)
    tokenizer = load_tokenizer(policy)
    context = model_context(policy)
    budget = resolve_budget("dpo", cfg.max_prompt_length, cfg.max_length, context)
    fitted = fit_rows(
        encode_rankings(tokenizer, rows),
        budget,
        stage="dpo",
        truncation=truncation,
        max_dropped_fraction=max_dropped_fraction,
        sources=row_sources(rows, comparisons),
    )
    rows = [rows[i] for i in fitted.kept]
    pairs = preference_pairs(fitted.rows, rows)
    if not pairs and cfg.loss_type != "kto":
        raise ValueError(f"{comparisons}: no untied pair to learn from")
    from transformers import set_seed

    set_seed(cfg.seed)  # what trl does before it creates adapters: the same initial LoRA weights
    partitioned = dist.partitioned(distributed)
    model = load(policy, tuning, "causal_lm", partitioned=partitioned)
    same_start = Path(policy).resolve() == Path(reference).resolve()
    free_ref = shares_base(tuning) and same_start
    where = device(tuning, partitioned=partitioned)
    needs_ref = not (free_ref or cfg.loss_type in REFERENCE_FREE)  # SimPO and ORPO train without one
    frozen_dtype = compute_dtype(tuning.compute.precision)  # frozen: the compute dtype; trained: fp32 master weights
    ref = (
        load_causal_lm(reference, device=where, dtype=frozen_dtype).eval().requires_grad_(False) if needs_ref else None
    )
    with_images = any(row_vision(p) is not None for p, _ in fitted.rows)
    if with_images and cfg.loss_type not in (*OWN_LOSSES, "sigmoid"):
        raise ValueError(
            f"stage.dpo.loss_type: {cfg.loss_type!r} runs in trl's DPOTrainer, which gets no images here; image-text "
            f"rows train in our loop: sigmoid (DPO), {', '.join(OWN_LOSSES)}"
        )
    if cfg.loss_type in OWN_LOSSES or with_images:  # sigmoid DPO with images: the same loss, in our loop
        trained, metrics = _train_own(
            cfg, tuning, model, ref, tokenizer, rows, fitted.rows, checkpoint_dir, distributed
        )
    else:
        args = (cfg, tuning, model, ref, tokenizer, pairs, out_dir, budget, checkpoint_dir, distributed)
        trained, metrics = _train_trl(*args)
    metrics |= fitted.metrics("dpo/data")
    metrics["dpo/tokens"] = float(
        cfg.epochs * sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)
    )
    adapter = out_dir / "adapter" if tuning.peft.adapters else None
    with dist.gathered(trained, distributed):  # ZeRO-3: the full weights, on every rank
        if dist.is_main():
            export(trained, tuning, out_dir / "policy", base=Path(policy), adapter=adapter, partitioned=partitioned)
            save_tokenizer(tokenizer, out_dir / "policy")
    if not dist.is_main():  # the measures below read rank 0's published folder
        return Manifest("dpo", str(out_dir), "", metrics=metrics)
    if distributed is not None:
        dist.leave_trainer_zero3()
        ref = None  # the trainer prepared it for the group (partitioned under ZeRO-3): read it again
    where = device(tuning)  # the measures run whole, on the stage's device
    measured = {"device": where, "dtype": frozen_dtype}
    trained = load_causal_lm(out_dir / "policy", **measured).eval()  # what was published is what is measured
    reference_model = ref.to(where) if ref is not None else load_causal_lm(reference, **measured).eval()
    metrics |= _measures(cfg, tuning, trained, reference_model, tokenizer, held, budget, context)
    metrics["dpo/pairs"] = float(len(pairs))
    log_metrics(metrics)
    shutil.rmtree(out_dir / "trainer", ignore_errors=True)
    limits = {"max_prompt_length": budget.max_prompt_length, "max_length": budget.max_length}
    (out_dir / "budget.json").write_text(json.dumps(limits))  # evaluate scores held-out rows within them
    files = {"policy": "policy", "budget": "budget.json", **({"adapter": "adapter"} if adapter else {})}
    return Manifest("dpo", str(out_dir), folder_digest(out_dir), metrics=metrics, files=files)


def _measures(cfg: DpoConfig, tuning: Tuning, trained, reference_model, tokenizer, held, budget, context) -> dict:
    """The published policy's KL to the reference on sampled held-out prompts and its implicit-reward
    accuracy on held-out pairs, every forward in the stage's compute dtype."""
    metrics: dict[str, float] = {}
    precision = tuning.compute.precision
    unique = {json.dumps(r["prompt"]): r["prompt"] for r in held}  # a prompt may be a conversation
    prompts = list(unique.values())[: cfg.kl_prompts]
    if prompts:
        new_tokens = cfg.max_new_tokens or default_new_tokens(context)
        rollout = sample(
            trained,
            tokenizer,
            prompts,
            max_new_tokens=new_tokens,
            generator_seed=cfg.seed,
            max_prompt_length=context - new_tokens,
            precision=precision,
        )
        with amp(model_device(trained), precision):
            metrics["dpo/kl_to_sft"] = mean_token_kl(trained, reference_model, [rollout])
    held_encoded = [budget.fit_row(p, rs) for p, rs in encode_rankings(tokenizer, held)]
    held_pairs = preference_pairs(held_encoded, held)
    metrics["dpo/eval/pairs"] = float(len(held_pairs))
    if held_pairs:  # thumbs-only held-out rows (KTO labels, one response a prompt) hold no pair to rank
        with amp(model_device(trained), precision):
            metrics["dpo/eval/accuracy"] = implicit_reward_accuracy(
                trained, reference_model, tokenizer.pad_token_id, held_pairs
            )
    return metrics
