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
from torch.overrides import TorchFunctionMode

from stages.models.compute import amp, autocast, compute_dtype

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


# ---- 1. every stage and algorithm on the device, checked by hooks ------------------------------------------
class DeviceWatch:
    """A global forward hook with kwargs (transformers models are called with them; torch's global
    pre-hooks get no kwargs) on every module: which transformers models ran, and any whose weights or
    tensor inputs were off `device`. `DtypeWatch` checks every product's operands as well."""

    def __init__(self, device: torch.device) -> None:
        from transformers import PreTrainedModel

        self.device, self.base = device, PreTrainedModel
        self.stage = "?"
        self.seen: dict[str, set[str]] = {}
        self.off: list[str] = []
        self.handle = torch.nn.modules.module.register_module_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, output):
        if not isinstance(module, self.base):
            return None
        param = next(module.parameters(), None)
        where = {str(param.device)} if param is not None else set()
        values = list(args) + list(kwargs.values())
        where |= {str(t.device) for t in values if isinstance(t, torch.Tensor)}
        self.seen.setdefault(self.stage, set()).add(type(module).__name__)
        wrong = {w for w in where if torch.device(w).type != self.device.type}
        if wrong:
            self.off.append(f"{self.stage}: {type(module).__name__} ran on {', '.join(sorted(wrong))}")
        return None

    def close(self) -> None:
        self.handle.remove()


MATMULS = {"linear", "matmul", "__matmul__", "bmm", "mm", "addmm", "baddbmm", "scaled_dot_product_attention"}
ISLANDS = (
    "RotaryEmbedding",  # transformers computes rotary frequencies in fp32 with autocast off, on purpose
    "get_delta_weight",  # peft merges adapters into the fp32 weights at export: weights, not activations
)


class DtypeWatch(TorchFunctionMode):
    """Records the dtype every linear, matmul and attention computed in (its output's: autocast has
    applied by then), per stage; outside the named fp32 islands each must be `dtype` (None: only the
    operands' device is checked), and every operand must be on `device`."""

    def __init__(self, dtype: torch.dtype | None, device: torch.device) -> None:
        super().__init__()
        self.dtype, self.device, self.stage = dtype, device, "?"
        self.counts: dict[str, dict[str, int]] = {}
        self.wrong: dict[str, set[str]] = {}
        self.off: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name in MATMULS:
            devices = {a.device.type for a in args if isinstance(a, torch.Tensor)}
            if devices - {self.device.type}:
                self.off.add(f"{self.stage}: {name} on {', '.join(sorted(devices))} at {_caller()}")
        if self.dtype is not None and name in MATMULS and isinstance(out, torch.Tensor) and out.is_floating_point():
            seen = self.counts.setdefault(self.stage, {})
            seen[str(out.dtype)] = seen.get(str(out.dtype), 0) + 1
            if out.dtype != self.dtype and not _in_island():
                self.wrong.setdefault(self.stage, set()).add(f"{name} in {out.dtype} at {_caller()}")
        return out


def _frames():
    frame = sys._getframe(2)
    while frame is not None:
        yield frame
        frame = frame.f_back


def _in_island() -> bool:
    return any(island in f.f_code.co_qualname for f in _frames() for island in ISLANDS)


def _caller() -> str:
    """The first frame outside torch and this file: the code that asked for the product."""
    for f in _frames():
        if "/torch/" not in f.f_code.co_filename and f.f_code.co_filename != __file__:
            return f"{Path(f.f_code.co_filename).name}:{f.f_lineno} ({f.f_code.co_qualname})"
    return "?"


class Cases:
    """Runs each case alone (one failure is a row, not the end of the check), under both watches."""

    def __init__(self, device: torch.device, work: Path, precision: str) -> None:
        self.device, self.work = device, work
        self.watch = DeviceWatch(device)
        self.dtypes = DtypeWatch(compute_dtype(precision) if precision != "fp32" else None, device)
        self.ran: list[str] = []
        self.skipped: dict[str, str] = {}
        self.failed: dict[str, str] = {}

    def run(self, name: str, fn, *args, **kwargs):
        from stages.runtime import device_guard

        self.watch.stage = name
        self.dtypes.stage = name
        out = self.work / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        t0 = time.perf_counter()
        try:
            with device_guard.maybe_guard(name), self.dtypes:
                result = fn(*args, **kwargs, out_dir=out)
        except Exception as e:  # the report names the case that failed and why
            self.failed[name] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-4)}"
            print(f"FAILED {name}: {type(e).__name__}: {e}", flush=True)
            return None
        self.ran.append(name)
        print(f"ran {name} in {time.perf_counter() - t0:.1f} s", flush=True)
        return result

    def skip(self, name: str, why: str) -> None:
        self.skipped[name] = why
        print(f"skipped {name}: {why}", flush=True)

    def report(self) -> dict:
        self.watch.close()
        wrong = {k: sorted(v) for k, v in self.dtypes.wrong.items()}
        off = self.watch.off + sorted(self.dtypes.off)
        return {
            "ran": self.ran,
            "skipped": self.skipped,
            "failed": self.failed,
            "off_device": off,
            "off_dtype": wrong,
            "dtypes": self.dtypes.counts,
            "models_seen": {k: sorted(v) for k, v in self.watch.seen.items()},
            "ok": not self.failed and not off and not wrong,
        }


def branches(device: torch.device, work: Path, *, precision: str = "bf16", quick: bool = False) -> dict:
    """Every stage and algorithm on the embedded task at tiny sizes, on `device` in `precision`: the four
    branches, every advantage estimator, RLVR, every preference loss (`quick`: one of trl's), best-of-n,
    the serving engine, QLoRA's bases where their packages are, ZeRO-3 with LoRA on one GPU."""
    from stages import best_of_n, comparisons, dpo, evaluate, judge, ppo, prepare, reward_model, sft
    from stages.settings.labeling import LabelerConfig
    from stages.settings.models import ComputeConfig, ModelConfig, PeftConfig, Tuning
    from stages.settings.recipe import CRITIC_FREE, GROUPED, OWN_LOSSES, TRL_LOSSES

    compute = ComputeConfig(device=str(device), precision=precision)
    lora = Tuning(peft=PeftConfig(method="lora", stages=["sft", "dpo"]), compute=compute)
    full = Tuning(peft=PeftConfig(method="full"), compute=compute)
    ai = LabelerConfig(kind="ai")
    cases = Cases(device, work, precision)
    on = {"device": str(device), "precision": precision}
    data = prepare.DataConfig(
        n_demonstrations=400, n_comparison_prompts=64, n_heldout_comparison_prompts=16, n_ppo_prompts=64,
        n_eval_prompts=32,
    )  # fmt: skip
    base_cfg = ModelConfig(hidden_size=32, intermediate_size=64, pretrain_documents=300, pretrain_epochs=1)
    prep = cases.run("prepare", prepare.run, data, base_cfg, **on)
    if prep is None:
        return cases.report()
    if have("trl"):
        pol = cases.run("sft", sft.run, sft.SftConfig(epochs=1), lora.for_stage("sft"), base=prep.file("base"),
                        demonstrations=prep.file("demonstrations"))  # fmt: skip
    else:
        pol = None
        cases.skip("sft", "trl not installed (make gpu-wheels carries it): the prepared base stands in")
    policy = pol.file("policy") if pol is not None else prep.file("base")
    prompts = {"prompts": prep.file("comparison_prompts"), "heldout_prompts": prep.file("heldout_comparison_prompts")}
    cmp = cases.run("comparisons", comparisons.run, comparisons.ComparisonsConfig(), LabelerConfig(), policy=policy,
                    target_len=6, **on, **prompts)  # fmt: skip
    if cmp is None:
        return cases.report()
    held = {"comparisons": cmp.file("comparisons"), "heldout": cmp.file("heldout_comparisons")}
    rm = cases.run("reward_model", reward_model.run, reward_model.RewardModelConfig(), full, policy=policy, **held)
    if rm is None:
        return cases.report()
    scored = {"reward_model": rm.file("model"), "normalization": rm.file("normalization")}
    ppo_in = {"prompts": prep.file("ppo_prompts"), "pretrain": prep.file("pretrain"), "gold": "embedded"}
    tiny = {"updates": 2, "rollouts_per_update": 16, "minibatch_size": 8}
    rlhf = cases.run("ppo", ppo.run, ppo.PpoConfig(**tiny, ptx_coef=0.1), full, policy=policy, **scored, **ppo_in)
    ev = {"sft_policy": policy, "prompts": prep.file("eval_prompts"), "target_len": 6, **on}
    if rlhf is not None:
        cases.run("evaluate", evaluate.run, evaluate.EvaluateConfig(), policy=rlhf.file("policy"), **scored,
                  heldout_comparisons=cmp.file("heldout_comparisons"), **ev)  # fmt: skip
    shared = Tuning(peft=PeftConfig(method="lora"), compute=compute)
    cases.run("ppo_shared_base", ppo.run, ppo.PpoConfig(**tiny, layout="shared_base"), shared, policy=policy,
              **scored, **ppo_in)  # fmt: skip
    for estimator in CRITIC_FREE:
        group = {"samples_per_prompt": 4 if estimator in GROUPED else 1, "kl_penalty": "loss"}
        cases.run(f"ppo_{estimator}", ppo.run, ppo.PpoConfig(**tiny, advantage=estimator, **group), full,
                  policy=policy, **scored, **ppo_in)  # fmt: skip
    variants = {  # DAPO's and GSPO's keys of the same loop (conf/pipeline/dapo.yaml, gspo.yaml)
        "dapo": {"clip_high": 0.28, "beta": 0.0, "dynamic_sampling": True, "max_refills": 1, "overlong_buffer": 2},
        "gspo": {"ratio_level": "sequence", "clip": 3e-4, "clip_high": 4e-4},
    }
    for name, keys in variants.items():
        grpo = {"advantage": "grpo", "samples_per_prompt": 4, "kl_penalty": "loss"}
        cases.run(f"ppo_{name}", ppo.run, ppo.PpoConfig(**tiny, **grpo, **keys), full, policy=policy, **scored,
                  **ppo_in)  # fmt: skip
    rlvr = ppo.PpoConfig(**tiny, advantage="grpo", samples_per_prompt=4, kl_penalty="loss",
                         reward_function="stages.rl.rewards:arithmetic_exact_match")  # fmt: skip
    cases.run("rlvr", ppo.run, rlvr, full, policy=policy, prompts=arithmetic_prompts(work / "arithmetic.jsonl"))
    cases.run("best_of_n", best_of_n.run, best_of_n.BestOfNConfig(prompts=8, n=4), policy=policy,
              prompts=prep.file("ppo_prompts"), **scored, **on)  # fmt: skip
    trl_losses = ((TRL_LOSSES[0],) if quick else TRL_LOSSES) if have("trl") else ()
    if not have("trl"):
        cases.skip("dpo (trl's losses)", "trl not installed (make gpu-wheels carries it)")
    for loss in (*trl_losses, *OWN_LOSSES):
        smoothing = 1e-3 if loss == "exo_pair" else 0.0  # EXO's epsilon (it refuses 0)
        dcfg = dpo.DpoConfig(loss_type=loss, kl_prompts=16, label_smoothing=smoothing)
        d = cases.run(f"dpo_{loss}", dpo.run, dcfg, lora.for_stage("dpo"), policy=policy, reference=policy, **held)
        if d is not None and loss == "sigmoid":
            cases.run("evaluate_dpo", evaluate.run, evaluate.EvaluateConfig(), policy=d.file("policy"),
                      heldout_comparisons=cmp.file("heldout_comparisons"), **ev)  # fmt: skip
    jcfg = judge.JudgeConfig(n_pairs=300, n_scores=200, n_eval_pairs=50)
    j = cases.run("judge", judge.run, jcfg, ai, compute, target_len=6)
    if j is not None:
        rlaif(cases, j, ai, full, policy, prompts, ppo_in, ev, tiny, on)
    cases.run("serve_engine", serve_engine, device, policy, precision)
    qlora(cases, prep.file("base"), compute)
    zero3_lora(cases, device, policy, held, compute)
    return cases.report()


def arithmetic_prompts(path: Path) -> Path:
    """The embedded verifiable task's prompts (RLVR's exact-match reward reads them), as a prompts file."""
    from stages.data import arithmetic

    train, _ = arithmetic.split(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in arithmetic.make_prompts(32, 0, train)))
    return path


def rlaif(cases: Cases, j, ai, full, policy, prompts, ppo_in, ev, tiny, on) -> None:
    """The AI labeler's branches: RLAIF (its comparisons train a reward model) and d-RLAIF (it scores PPO)."""
    from stages import comparisons, evaluate, ppo, reward_model

    acmp = cases.run("comparisons_ai", comparisons.run, comparisons.ComparisonsConfig(), ai, policy=policy,
                     target_len=6, judge=Path(j.path), **on, **prompts)  # fmt: skip
    if acmp is not None:
        soft = reward_model.RewardModelConfig(targets="soft")
        ai_held = {"comparisons": acmp.file("comparisons"), "heldout": acmp.file("heldout_comparisons")}
        arm = cases.run("reward_model_ai", reward_model.run, soft, full, policy=policy, **ai_held)
        if arm is not None:
            ascored = {"reward_model": arm.file("model"), "normalization": arm.file("normalization")}
            cases.run("ppo_rlaif", ppo.run, ppo.PpoConfig(**tiny), full, policy=policy, **ascored, **ppo_in)
    direct = cases.run("ppo_rlaif_direct", ppo.run, ppo.PpoConfig(**tiny), full, ai, policy=policy,
                       judge=Path(j.path), **ppo_in)  # fmt: skip
    if direct is not None:
        cases.run("evaluate_rlaif_direct", evaluate.run, evaluate.EvaluateConfig(), ai, policy=direct.file("policy"),
                  judge=Path(j.path), **{**ev, "gold": None})  # fmt: skip


def serve_engine(device: torch.device, policy: Path, precision: str, out_dir: Path) -> None:
    """serve-model's and chat's batched decoder on the device: three prompts of different lengths in one
    batch, each greedy answer equal to `generate`'s alone (both under the compute dtype's autocast)."""
    import queue

    from flows.serving.decoder import Decoder, Done, Request
    from stages.models.modeling import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(policy), load_causal_lm(policy, device=device).eval()
    prompts = [tok(p)["input_ids"] for p in ("describe the garden", "tell me", "write about the school and the sea")]
    engine = Decoder(model, tok, window_s=1.0, precision=precision)
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
        with amp(device, precision):
            alone = model.generate(torch.tensor([ids], device=device), max_new_tokens=8, do_sample=False,
                                   pad_token_id=tok.pad_token_id)  # fmt: skip
        want = tok.decode(alone[0, len(ids) :].tolist(), skip_special_tokens=True)
        assert want.startswith(text) or text.startswith(want), (text, want)  # EOS may end one earlier


def qlora(cases: Cases, base: Path, compute) -> None:
    """QLoRA on each quantised base this machine has: bitsandbytes' NF4 (a clear skip without it, as on
    the GPU image), torchao's int8 and quanto's int4 (carried); torchao int4 is refused by preflight."""
    from stages.settings.models import PeftConfig

    small = {"method": "qlora", "r": 4, "alpha": 8}
    bases = {
        "qlora_bitsandbytes_nf4": ("bitsandbytes", PeftConfig(**small, quant_bits=4)),
        "qlora_torchao_int8": ("torchao", PeftConfig(**small, quant_method="torchao", quant_bits=8)),
        "qlora_quanto_int4": ("optimum", PeftConfig(**small, quant_method="quanto", quant_bits=4)),
    }
    from stages.models.peft_setup import check_quantization

    for name, (package, peft) in bases.items():
        try:
            check_quantization(peft, compute.precision)
        except ValueError as refused:
            cases.skip(name, f"refused before compute: {refused}")
            continue
        if not have(package):
            cases.skip(name, f"{package} not installed")
        elif package == "bitsandbytes" and compute.device == "cpu":
            cases.skip(name, "bitsandbytes' NF4 on this CPU: tests/test_peft_methods.py covers it; here a GPU case")
        else:
            cases.run(name, qlora_steps, base, peft, compute)


def qlora_steps(base: Path, peft, compute, out_dir: Path) -> None:
    """A 128-wide copy of the base's architecture (quantised kernels pack groups of 128), three LoRA
    steps under the compute dtype's autocast, merged onto the full-precision base."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.models import tuning as tuning_lib
    from stages.models.modeling import load_tokenizer
    from stages.settings.models import Tuning

    tok = load_tokenizer(base)
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2))  # fmt: skip
    wide.save_pretrained(out_dir / "base")
    tok.save_pretrained(out_dir / "base")
    tuning = Tuning(peft=peft, compute=compute)
    model = tuning_lib.load(out_dir / "base", tuning, "causal_lm")
    opt = tuning_lib.optimizer(model, tuning, lr=1e-2)
    ids = torch.tensor([[5, 17, 19, 3, 12, 7]], device=tuning_lib.device(tuning))  # within the tiny vocabulary
    for _ in range(3):
        opt.zero_grad()
        with autocast(compute):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
    tuning_lib.export(model, tuning, out_dir / "merged", base=out_dir / "base", adapter=out_dir / "adapter")
    assert (out_dir / "merged" / "model.safetensors").is_file()


def zero3_lora(cases: Cases, device: torch.device, policy: Path, held: dict, compute) -> None:
    """The reward model under ZeRO-3 with LoRA, one rank on one GPU (a process group of one)."""
    if not have("deepspeed"):
        cases.skip(
            "zero3_lora", "deepspeed not installed (the GPU image lacks it; tests/test_distributed.py runs ZeRO-3)"
        )
        return
    if device.type != "cuda":
        cases.skip("zero3_lora", "a GPU case: ZeRO-3 on the CPU runs in tests/test_distributed.py")
        return
    import os

    from stages import reward_model
    from stages.runtime import process_group as dist
    from stages.settings.distributed import DistributedConfig
    from stages.settings.models import PeftConfig, Tuning

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", "29512")
    cfg = DistributedConfig(mode="zero3", nproc_per_node=1, deepspeed={"zero_optimization": {"stage": 3}})
    dist.init(cfg, str(device))
    tuning = Tuning(peft=PeftConfig(method="lora", stages=["reward_model"]), compute=compute)
    cases.run("zero3_lora", reward_model.run, reward_model.RewardModelConfig(), tuning.for_stage("reward_model"),
              policy=policy, distributed=cfg, **held)  # fmt: skip


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
    bf16 = "bf16"
    variants = [
        ("bf16 sdpa", {"precision": bf16}, "full"),
        ("fp32 sdpa", {"precision": "fp32"}, "full"),
        ("bf16 sdpa + checkpointing", {"precision": bf16, "gradient_checkpointing": True}, "full"),
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


def summary(b: dict) -> str:
    """What ran, what was skipped and why, and every failure and mismatch, one line each."""
    lines = [f"ran {len(b['ran'])} stages and algorithms: {', '.join(b['ran'])}"]
    lines += [f"skipped {name}: {why}" for name, why in b["skipped"].items()]
    lines += [f"FAILED {name}: {why.splitlines()[0]}" for name, why in b["failed"].items()]
    lines += [f"OFF THE DEVICE {line}" for line in b["off_device"]]
    lines += [f"OFF THE COMPUTE DTYPE {stage}: {'; '.join(w)}" for stage, w in b["off_dtype"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="small model and data (a smoke run of this script)")
    parser.add_argument("--seq", type=int, default=512, help="prompt + response tokens per row")
    parser.add_argument("--skip-branches", action="store_true")
    parser.add_argument("--skip-timings", action="store_true")
    parser.add_argument("--quick", action="store_true", help="one of trl's DPO losses, not all fourteen")
    parser.add_argument("--precision", default="bf16", help="the branches' compute.precision")
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
            b = report["branches"] = branches(device, work / "branches", precision=args.precision, quick=args.quick)
            print(summary(b))
        if not args.skip_timings:
            report["timings"] = timings(device, work / "timings", small=args.small, seq=args.seq)
            for r in report["timings"]:
                print(json.dumps(r))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
        ok = report.get("branches", {}).get("ok", True) and not any("failed" in r for r in report.get("timings", []))
        print("gpu-check: " + ("ok" if ok else "FAILED (see above)"))
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
