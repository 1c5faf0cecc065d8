"""`make gpu-check`: every stage on the GPU, checked, then timed on a 0.5B-parameter model.

    python -m bench.gpu_check                   # on a CUDA machine; elsewhere one line and exit 0
    python -m bench.gpu_check --device cpu --small   # the same code path on the CPU, small (a smoke run)

1. **Branches.** Every branch (rlhf, dpo, rlaif, rlaif_direct) and PPO's shared-base layout run on the
   embedded task at `+experiment=tiny`'s sizes with `compute.device=cuda`, calling the stages
   directly (they import neither Prefect, Hydra nor MLflow: the GPU machine may lack them). A
   forward pre-hook on every `transformers` model records the device of its weights and of its
   tensor inputs; any model that trained or sampled off the GPU fails the check, named.
2. **Timings.** A random-init Llama with Qwen2.5-0.5B's shapes and GPT-2's tokenizer (with our chat
   markers) runs SFT, the reward model, one PPO update (HF generation; vLLM where installed) and DPO
   in bf16, then with flash-attention and Liger where installed, and QLoRA 4-bit where bitsandbytes
   is. Rows are synthetic (random words, ~`--seq` tokens), which is what throughput needs. Each row
   of the table: wall seconds, tokens per second (the stage's own token count over that time) and
   peak GPU memory. What is not installed is listed as skipped, with why.

Writes `artifacts/bench/gpu_check.json`. trl and datasets (SFT, pairwise DPO) may be carried to a GPU
machine as wheels: `make gpu-wheels` (see README, "GPU check").
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOKENIZERS = [ROOT.parent / "shared" / "tokenizers" / "gpt2", ROOT / ".gpu" / "gpt2"]
QWEN_05B = {  # Qwen2.5-0.5B's shapes, on a Llama (the same blocks but the q/k/v biases)
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
}
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2}  # fmt: skip


def have(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


# ---- 1. every branch on the device, checked by hooks ----------------------------------------------------
class DeviceWatch:
    """A forward pre-hook on every transformers model: which models ran where, and what ran off `device`."""

    def __init__(self, device: torch.device) -> None:
        from transformers import PreTrainedModel

        self.device, self.base = device, PreTrainedModel
        self.stage = "?"
        self.seen: dict[str, set[str]] = {}
        self.off: list[str] = []
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self.hook)

    def hook(self, module, args, kwargs=None):
        if not isinstance(module, self.base):
            return
        param = next(module.parameters(), None)
        where = {str(param.device)} if param is not None else set()
        values = list(args) + list((kwargs or {}).values())
        where |= {str(t.device) for t in values if isinstance(t, torch.Tensor)}
        self.seen.setdefault(self.stage, set()).add(type(module).__name__)
        wrong = {w for w in where if torch.device(w).type != self.device.type}
        if wrong:
            self.off.append(f"{self.stage}: {type(module).__name__} ran on {', '.join(sorted(wrong))}")

    def close(self) -> None:
        self.handle.remove()


def branches(device: torch.device, work: Path) -> dict:
    """The four branches and the shared-base layout on the embedded task at tiny sizes, on `device`."""
    from stages import comparisons, dpo, evaluate, judge, ppo, prepare, reward_model, sft
    from stages.runtime import device_guard
    from stages.settings.labeling import LabelerConfig
    from stages.settings.models import ComputeConfig, ModelConfig, PeftConfig, Tuning

    compute = ComputeConfig(device=str(device))
    lora = Tuning(peft=PeftConfig(method="lora", stages=["sft", "dpo"]), compute=compute)
    full = Tuning(peft=PeftConfig(method="full"), compute=compute)
    ai = LabelerConfig(kind="ai")
    watch = DeviceWatch(device)
    ran: list[str] = []
    failed: dict[str, str] = {}

    def stage(name: str, fn, *args, **kwargs):
        watch.stage = name
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        with device_guard.maybe_guard(name):  # ALIGNFLOW_DEVICE_GUARD=1: our own code's discipline too
            manifest = fn(*args, **kwargs, out_dir=out)
        ran.append(name)
        return manifest

    try:
        data = prepare.DataConfig(
            n_demonstrations=400, n_comparison_prompts=64, n_heldout_comparison_prompts=16, n_ppo_prompts=64,
            n_eval_prompts=32,
        )  # fmt: skip
        prep = stage("prepare", prepare.run, data, ModelConfig(hidden_size=32, intermediate_size=64,
                     pretrain_documents=300, pretrain_epochs=1))  # fmt: skip
        pol = stage("sft", sft.run, sft.SftConfig(epochs=1), lora.for_stage("sft"), base=prep.file("base"),
                    demonstrations=prep.file("demonstrations")) if have("trl") else None  # fmt: skip
        policy = pol.file("policy") if pol is not None else prep.file("base")  # without trl: the base stands in
        prompts = {
            "prompts": prep.file("comparison_prompts"),
            "heldout_prompts": prep.file("heldout_comparison_prompts"),
        }
        cmp = stage("comparisons", comparisons.run, comparisons.ComparisonsConfig(), LabelerConfig(), policy=policy,
                    target_len=6, device=str(device), **prompts)  # fmt: skip
        held = {"comparisons": cmp.file("comparisons"), "heldout": cmp.file("heldout_comparisons")}
        rm = stage("reward_model", reward_model.run, reward_model.RewardModelConfig(), full, policy=policy, **held)
        scored = {"reward_model": rm.file("model"), "normalization": rm.file("normalization")}
        tiny_ppo = ppo.PpoConfig(updates=2, rollouts_per_update=16, minibatch_size=8)
        ppo_in = {"prompts": prep.file("ppo_prompts"), "pretrain": prep.file("pretrain"), "gold": "embedded"}
        rlhf = stage("ppo", ppo.run, tiny_ppo, full, policy=policy, **scored, **ppo_in)
        ev = {"sft_policy": policy, "prompts": prep.file("eval_prompts"), "target_len": 6, "device": str(device)}
        stage("evaluate", evaluate.run, evaluate.EvaluateConfig(), policy=rlhf.file("policy"), **scored,
              heldout_comparisons=cmp.file("heldout_comparisons"), **ev)  # fmt: skip
        shared = Tuning(peft=PeftConfig(method="lora"), compute=compute)
        stage("ppo_shared_base", ppo.run, ppo.PpoConfig(updates=2, rollouts_per_update=16, minibatch_size=8,
              layout="shared_base"), shared, policy=policy, **scored, **ppo_in)  # fmt: skip
        loss = "sigmoid" if have("trl") else "plackett_luce"  # pairwise DPO is trl's
        d = stage("dpo", dpo.run, dpo.DpoConfig(loss_type=loss, kl_prompts=16), lora.for_stage("dpo"),
                  policy=policy, reference=policy, **held)  # fmt: skip
        stage("evaluate_dpo", evaluate.run, evaluate.EvaluateConfig(), policy=d.file("policy"),
              heldout_comparisons=cmp.file("heldout_comparisons"), **ev)  # fmt: skip
        jcfg = judge.JudgeConfig(n_pairs=300, n_scores=200, n_eval_pairs=50)
        j = stage("judge", judge.run, jcfg, ai, compute, target_len=6)
        acmp = stage("comparisons_ai", comparisons.run, comparisons.ComparisonsConfig(), ai, policy=policy,
                     target_len=6, device=str(device), judge=Path(j.path), **prompts)  # fmt: skip
        soft = reward_model.RewardModelConfig(targets="soft")
        ai_held = {"comparisons": acmp.file("comparisons"), "heldout": acmp.file("heldout_comparisons")}
        arm = stage("reward_model_ai", reward_model.run, soft, full, policy=policy, **ai_held)
        ascored = {"reward_model": arm.file("model"), "normalization": arm.file("normalization")}
        stage("ppo_rlaif", ppo.run, tiny_ppo, full, policy=policy, **ascored, **ppo_in)
        direct = stage("ppo_rlaif_direct", ppo.run, tiny_ppo, full, ai, policy=policy, judge=Path(j.path), **ppo_in)
        stage("evaluate_rlaif_direct", evaluate.run, evaluate.EvaluateConfig(), ai, policy=direct.file("policy"),
              judge=Path(j.path), **{**ev, "gold": None})  # fmt: skip
        watch.stage = "serve_engine"
        serve_engine(device, policy)
        ran.append("serve_engine")
        if have("torchao"):
            watch.stage = "qlora_torchao_int4"
            torchao_int4(device, prep.file("base"), work / "qlora_torchao_int4", compute)
            ran.append("qlora_torchao_int4")
    except Exception as e:  # the report names the stage that failed and why
        failed[watch.stage] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"
    finally:
        watch.close()
    return {
        "ran": ran,
        "skipped": [] if have("trl") else ["sft (trl not installed: the prepared base stands in)"],
        "failed": failed,
        "off_device": watch.off,
        "models_seen": {k: sorted(v) for k, v in watch.seen.items()},
        "ok": not failed and not watch.off,
    }


def serve_engine(device: torch.device, policy: Path) -> None:
    """serve-model's and chat's batched decoder on the GPU: three prompts of different lengths in one
    batch, each greedy answer equal to `generate`'s alone."""
    import queue

    from flows.ops.engine import Done, Engine, Request
    from stages.models.modeling import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(policy), load_causal_lm(policy, device=device).eval()
    prompts = [tok(p)["input_ids"] for p in ("describe the garden", "tell me", "write about the school and the sea")]
    engine = Engine(model, tok, window_s=1.0)
    boxes = [queue.Queue() for _ in prompts]
    for ids, box in zip(prompts, boxes, strict=True):
        engine.submit(Request(ids, 8, box.put, temperature=0.0))
    answers = []
    for box in boxes:
        while not isinstance(event := box.get(timeout=120), Done):
            assert not isinstance(event, Exception), event
        answers.append(event.text)
    engine.close()
    assert engine.largest_batch == len(prompts), engine.largest_batch
    for ids, text in zip(prompts, answers, strict=True):
        alone = model.generate(torch.tensor([ids], device=device), max_new_tokens=8, do_sample=False,
                               pad_token_id=tok.pad_token_id)  # fmt: skip
        want = tok.decode(alone[0, len(ids) :].tolist(), skip_special_tokens=True)
        assert want.startswith(text) or text.startswith(want), (text, want)  # EOS may end one earlier


def torchao_int4(device: torch.device, base: Path, out: Path, compute) -> None:
    """QLoRA on torchao's int4 weight-only base (CUDA only; refused on CPU): a 128-wide copy of the
    base's architecture (int4 packs groups of 128), three LoRA steps, merged on the full-precision base."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.models import tuning as tuning_lib
    from stages.models.modeling import load_tokenizer
    from stages.settings.models import PeftConfig, Tuning

    tok = load_tokenizer(base)
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2))  # fmt: skip
    wide.save_pretrained(out / "base")
    tok.save_pretrained(out / "base")
    tuning = Tuning(
        peft=PeftConfig(method="qlora", quant_method="torchao", quant_bits=4, r=4, alpha=8), compute=compute
    )
    model = tuning_lib.load(out / "base", tuning, "causal_lm")
    opt = tuning_lib.optimizer(model, tuning, lr=1e-2)
    ids = torch.tensor([[5, 17, 99, 3, 42, 7]], device=device)
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    tuning_lib.export(model, tuning, out / "merged", base=out / "base", adapter=out / "adapter")
    assert (out / "merged" / "model.safetensors").is_file()


# ---- 2. timings on a 0.5B model ---------------------------------------------------------------------------
def build_model(folder: Path, shapes: dict, context: int) -> Path:
    from transformers import GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM

    from stages.data.tokens import ensure_chat_template

    source = next((p for p in TOKENIZERS if p.exists()), None)
    if source is None:
        raise FileNotFoundError(
            f"GPT-2's tokenizer: none of {', '.join(map(str, TOKENIZERS))} (make gpu-wheels copies it)"
        )
    tok = GPT2TokenizerFast.from_pretrained(str(source))
    ensure_chat_template(tok)
    tok.pad_token = tok.eos_token
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=context, tie_word_embeddings=True,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, **shapes)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def synthetic(work: Path, n: int, seq: int, k: int = 2) -> dict[str, Path]:
    """Demonstrations, K-way comparisons and prompts of random words: ~seq/2 tokens of prompt and of response."""
    rng = random.Random(0)
    words = "the a garden ocean friend lovely quiet river light stone bright morning story answer".split()

    def text(tokens: int) -> str:
        return " ".join(rng.choice(words) for _ in range(tokens))

    half = max(4, seq // 2 - 8)
    files = {name: work / f"{name}.jsonl" for name in ("demos", "comparisons", "heldout", "prompts")}
    rows = {
        "demos": [{"messages": [{"role": "user", "content": text(half)}, {"role": "assistant", "content": text(half)}]}
                  for _ in range(n)],
        "comparisons": [{"prompt": text(half), "responses": [text(half) for _ in range(k)],
                         "ranks": list(range(k)), "finished": [True] * k} for _ in range(n)],
        "heldout": [{"prompt": text(half), "responses": [text(half) for _ in range(k)],
                     "ranks": list(range(k)), "finished": [True] * k} for _ in range(max(8, n // 4))],
        "prompts": [{"prompt": text(half)} for _ in range(n)],
    }  # fmt: skip
    for name, path in files.items():
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[name]))
    return files


def timed(device: torch.device, fn) -> tuple[float, float, object]:
    """(seconds, peak GPU memory in GiB, result) of `fn()`."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return time.perf_counter() - t0, peak, result


def timings(device: torch.device, work: Path, *, small: bool, seq: int) -> list[dict]:
    """Every variant this machine can run (what it cannot: listed as skipped), each stage timed."""
    n = 16 if small else 128
    base = build_model(work / "model", SMALL if small else QWEN_05B, context=max(2 * seq, 256))
    files = synthetic(work, n, seq)
    bf16 = "bf16" if device.type == "cuda" else "fp32"
    variants = [
        (f"{bf16} sdpa", {"precision": bf16}, "full"),
        (f"{bf16} sdpa + checkpointing", {"precision": bf16, "gradient_checkpointing": True}, "full"),
    ]
    rows: list[dict] = []
    extra = {
        "flash_attention_2": ("flash_attn", {"precision": bf16, "attention": "flash_attention_2"}, "full"),
        "liger kernels": ("liger_kernel", {"precision": bf16, "kernels": "liger"}, "full"),
        "qlora 4-bit": ("bitsandbytes", {"precision": bf16}, "qlora"),
    }
    for name, (package, comp, method) in extra.items():
        if have(package) and device.type == "cuda":
            variants.append((name, comp, method))
        else:
            why = f"{package} not installed" if device.type == "cuda" else "a GPU variant"
            rows.append({"variant": name, "skipped": why})
    for name, comp, method in variants:
        rows += variant(device, work / f"v{len(rows)}", name, comp, method, base, files, small=small, seq=seq)
    return rows


def variant(device, out: Path, name: str, comp: dict, method: str, base: Path, files, *, small: bool, seq: int):
    """SFT, the reward model, one PPO update (HF, and vLLM where installed) and DPO under one variant."""
    from stages import dpo, ppo, reward_model, sft
    from stages.settings.models import ComputeConfig, PeftConfig, Tuning

    tuning = Tuning(peft=PeftConfig(method=method), compute=ComputeConfig(device=str(device), **comp))
    budget = {"max_length": seq, "max_prompt_length": seq // 2}
    held = {"comparisons": files["comparisons"], "heldout": files["heldout"]}
    rows: list[dict] = []

    def row(stage: str, fn, tokens_key: str) -> None:
        folder = out / stage.split(" ")[0]
        folder.mkdir(parents=True, exist_ok=True)
        try:
            seconds, peak, manifest = timed(device, lambda: fn(folder))
            tokens = manifest.metrics.get(tokens_key, float("nan"))
            rows.append(
                {
                    "variant": name,
                    "stage": stage,
                    "seconds": round(seconds, 2),
                    "tokens_per_second": round(tokens / seconds, 1),
                    "peak_gib": round(peak, 2),
                }
            )
        except Exception as e:  # one variant's failure is a row of the table, not the end of the check
            rows.append({"variant": name, "stage": stage, "failed": f"{type(e).__name__}: {e}"})
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if have("trl"):
        sft_cfg = sft.SftConfig(epochs=1, batch_size=8, learning_rate=1e-5, **budget)
        row(
            "sft", lambda o: sft.run(sft_cfg, tuning, base=base, demonstrations=files["demos"], out_dir=o), "sft/tokens"
        )
    else:
        rows.append({"variant": name, "stage": "sft", "skipped": "trl not installed (make gpu-wheels)"})
    rm_cfg = reward_model.RewardModelConfig(batch_prompts=8, learning_rate=1e-5, **budget)
    row("reward_model", lambda o: reward_model.run(rm_cfg, tuning, policy=base, out_dir=o, **held), "rm/tokens")
    rm = out / "reward_model"
    scored = {"reward_model": rm / "model", "normalization": rm / "normalization.json", "prompts": files["prompts"]}
    vllm = have("vllm") and device.type == "cuda" and method == "full"
    for gen in ["hf", "vllm"] if vllm else ["hf"]:
        cfg = ppo.PpoConfig(
            updates=1,
            rollouts_per_update=8 if small else 64,
            minibatch_size=8,
            max_new_tokens=seq // 2,
            max_prompt_length=seq // 2,
            generation=gen,
            ema_decay=None,
        )
        if (rm / "model").exists():
            row(
                f"ppo update ({gen})",
                lambda o, c=cfg: ppo.run(c, tuning, policy=base, out_dir=o, **scored),
                "ppo/tokens",
            )
    loss = "sigmoid" if have("trl") else "plackett_luce"  # pairwise DPO is trl's
    dcfg = dpo.DpoConfig(loss_type=loss, batch_size=8, learning_rate=1e-6, kl_prompts=8, max_new_tokens=16, **budget)
    row(f"dpo ({loss})", lambda o: dpo.run(dcfg, tuning, policy=base, reference=base, out_dir=o, **held), "dpo/tokens")
    shutil.rmtree(out, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="small model and data (a smoke run of this script)")
    parser.add_argument("--seq", type=int, default=512, help="prompt + response tokens per row")
    parser.add_argument("--skip-branches", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "artifacts" / "bench" / "gpu_check.json"))
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine; nothing checked (run it where a GPU is lent)")
        return 0
    device = torch.device(args.device if args.device != "cuda" else "cuda:0")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    work = Path(tempfile.mkdtemp(prefix="alignflow-gpu-check-"))
    try:
        packages = ("trl", "datasets", "flash_attn", "liger_kernel", "bitsandbytes", "vllm", "deepspeed", "torchao")
        report: dict = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "installed": {p: have(p) for p in packages},
        }
        if not args.skip_branches:
            report["branches"] = branches(device, work / "branches")
            b = report["branches"]
            off = b["off_device"] or "none"
            print(f"branches: ran {len(b['ran'])} stages; failed: {b['failed'] or 'none'}; off the device: {off}")
        report["timings"] = timings(device, work / "timings", small=args.small, seq=args.seq)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        for r in report["timings"]:
            print(json.dumps(r))
        print(f"wrote {args.out}")
        ok = report.get("branches", {}).get("ok", True) and not any("failed" in r for r in report["timings"])
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
