"""`make bench-peft`: every fine-tuning method and optimizer side by side, on the same random-init
Llama (about 110M parameters by default) and the same data, for a few steps of SFT (causal LM loss on
Alpaca demonstrations) and of reward modelling (pairwise loss on the DPO demo's chosen/rejected pairs),
both through the door the stages use (`stages/models/tuning.py`). Each (method, kind) runs in its own process,
so its peak RSS is its own. Figures, each also as a ratio to full fine-tuning's (AdamW):
- peak RSS: the whole process while it trains (the kernel's mark is reset once model and optimizer
  are built, so loading's transient copies do not count);
- peak anonymous RSS, sampled every 5 ms: tensors (weights, gradients, optimizer state, activations)
  and the interpreter's heap, without the mapped shared libraries every method shares;
- model state: weights + gradients + optimizer state, counted from the tensors.
Writes artifacts/bench/peft_methods.json and .md.

    python -m bench.peft_methods [--hidden 768 --layers 10 --steps 6 --seq 128 --batch 4]
    python -m bench.peft_methods --hidden 896 --layers 24 --extra qlora,flash,liger   # ~0.5B on a GPU
    python -m bench.peft_methods --only full,lora --extra ckpt   # with gradient checkpointing
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
OUT = ROOT / "artifacts" / "bench"
METHODS = [  # (label, peft.method, optim.name)
    ("full (AdamW)", "full", "adamw"),
    ("freeze (last 2 layers)", "freeze", "adamw"),
    ("houlsby m64", "houlsby", "adamw"),
    ("lora r16", "lora", "adamw"),
    ("rslora r16", "rslora", "adamw"),
    ("dora r16", "dora", "adamw"),
    ("pissa r16", "pissa", "adamw"),
    ("loraplus r16", "loraplus", "adamw"),
    ("qlora 4-bit r16", "qlora", "adamw"),
    ("qlora 8-bit r16", "qlora8", "adamw"),
    ("galore r128 (full)", "full", "galore"),
    ("badam (full)", "full", "badam"),
    ("adamw 8-bit (full)", "full", "adamw_8bit"),
]


def build_model(folder: Path, hidden: int, layers: int) -> Path:
    import torch
    from transformers import GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return folder
    tok = GPT2TokenizerFast.from_pretrained(str(SHARED / "tokenizers" / "gpt2"))
    tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def batches(tok, kind: str, steps: int, batch: int, seq: int):
    """The same rows for every method: Alpaca demonstrations (SFT), DPO-demo pairs (RM)."""
    demo = SHARED / "data" / "llamafactory-demo"
    if kind == "causal_lm":
        rows = json.loads((demo / "alpaca_en_demo.json").read_text())
        texts = [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in rows]
    else:
        rows = json.loads((demo / "dpo_en_demo.json").read_text())
        texts = []
        for r in rows:
            prompt = r["conversations"][-1]["value"]
            texts += [f"{prompt}\n{r['chosen']['value']}", f"{prompt}\n{r['rejected']['value']}"]
    tok.truncation_side = "left"  # keep the responses: a pair differs at its end
    out = []
    for s in range(steps):  # two batches in turn: the loss after N steps measures how fast a method fits them
        chunk = [texts[((s % 2) * batch + i) % len(texts)] for i in range(batch)]
        out.append(dict(tok(chunk, return_tensors="pt", padding="max_length", truncation=True, max_length=seq)))
    return out


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


class PeakSampler:
    """Samples /proc/self/status every 5 ms on a thread: the peak anonymous RSS (tensors, activations,
    optimizer state) apart from file-backed pages (safetensors weights mapped from disk count there
    until touched copies replace them)."""

    def __init__(self) -> None:
        import threading

        self.anon = self.file = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.005):
            self.anon = max(self.anon, status_mb("RssAnon"))
            self.file = max(self.file, status_mb("RssFile"))

    def stop(self) -> tuple[float, float]:
        self._done.set()
        self._thread.join()
        return self.anon, self.file


def reset_peak() -> float:
    """Free what loading left (glibc keeps freed heap), reset the kernel's peak-RSS mark (Linux
    clear_refs 5); returns the RSS now, in MB."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return status_mb("VmRSS")


def one(args) -> dict:
    """One (method, kind) in this process: load, `steps` optimizer steps, the figures."""
    import torch
    from transformers import AutoTokenizer

    from stages.models import tuning as tuning_lib
    from stages.models.compute import autocast
    from stages.models.optim import state_bytes
    from stages.settings.models import ComputeConfig, OptimConfig, PeftConfig, Tuning

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    method = args.method
    peft = PeftConfig(
        method={"rslora": "lora", "qlora8": "qlora"}.get(method, method),
        r=16,
        alpha=32,
        rslora=method == "rslora",
        quant_bits=8 if method == "qlora8" else 4,
        freeze_layers=2,
        pissa_niter=4,
        adapter_size=64,
    )
    optim = OptimConfig(name=args.optim, galore_rank=128, galore_update_proj_gap=200, badam_switch_every=50)
    extra = set(filter(None, args.extra.split(",")))
    compute = ComputeConfig(
        precision="bf16" if "bf16" in extra else "fp32",
        attention="flash_attention_2" if "flash" in extra else "sdpa",
        kernels="liger" if "liger" in extra else "none",
        gradient_checkpointing="ckpt" in extra,
    )
    tuning = Tuning(peft, optim, compute)
    tuning_lib.check(tuning)
    tok = AutoTokenizer.from_pretrained(args.model)
    data = batches(tok, args.kind, args.steps, args.batch, args.seq)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = tuning_lib.load(args.model, tuning, args.kind)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and method not in ("qlora", "qlora8"):
        model.to(device)
    opt = tuning_lib.optimizer(model, tuning, lr=1e-4)
    loaded = reset_peak()  # from here the peak is training's: loading's transient copies are over
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    model.train()
    sampler = PeakSampler()
    times, losses = [], []
    for b in data:
        b = {k: v.to(device) for k, v in b.items()}
        t0 = time.perf_counter()
        opt.zero_grad()
        with autocast(compute):
            if args.kind == "causal_lm":
                labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
                loss = model(**b, labels=labels).loss
            else:
                s = model(**b).logits.squeeze(-1).float()
                loss = -torch.nn.functional.logsigmoid(s[0::2] - s[1::2]).mean()
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    anon, file = sampler.stop()
    state = sum(p.numel() * p.element_size() for p in model.parameters())
    state += sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)  # gradients
    return {
        "peak_anon_rss_mb": anon,
        "peak_file_rss_mb": file,
        "model_state_mb": (state + state_bytes(opt)) / 2**20,
        "trainable_params": trainable,
        "total_params": total,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_model_mb": rss_before / 1024,
        "rss_loaded_mb": loaded,
        "training_peak_rss_mb": status_mb("VmHWM"),
        "optimizer_state_mb": state_bytes(opt) / 2**20,
        "step_s": sum(times[1:]) / max(1, len(times) - 1),  # the first step warms up
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
    }


def _vs(r: dict, full: dict | None, key: str, digits: int = 2) -> str:
    """`value (x full's)`."""
    if full is None:
        return f"{r[key]:.0f}"
    return f"{r[key]:.0f} ({r[key] / full[key]:.{digits}f})"


def table(results: list[dict], steps: int) -> str:
    lines = [
        "| method | stage | trainable | peak RSS MB | peak anon RSS MB | model state MB | optimizer state MB "
        f"| step s | loss step 1 -> {steps} |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for kind in ("causal_lm", "scalar"):
        rows = [r for r in results if r["kind"] == kind]
        full = next((r for r in rows if r["label"].startswith("full") and "error" not in r), None)
        stage = "SFT" if kind == "causal_lm" else "RM"
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['label']} | {stage} | refused: {r['error']} | | | | | | |")
                continue
            lines.append(
                f"| {r['label']} | {stage} | {r['trainable_params'] / 1e6:.2f}M "
                f"({100 * r['trainable_params'] / r['total_params']:.1f}%) | {_vs(r, full, 'peak_rss_mb')} | "
                f"{_vs(r, full, 'peak_anon_rss_mb')} | {_vs(r, full, 'model_state_mb')} | "
                f"{_vs(r, full, 'optimizer_state_mb', 3)} | {r['step_s']:.2f} | "
                f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=max(1, len(os.sched_getaffinity(0))))
    ap.add_argument("--extra", default="", help="comma list: ckpt (gradient checkpointing); bf16, flash, liger (GPU)")
    ap.add_argument("--only", default="", help="comma list of labels' first words, e.g. full,lora")
    ap.add_argument("--out", default=str(OUT / "peft_methods"))
    # one measurement, in a child process
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--optim", help=argparse.SUPPRESS)
    ap.add_argument("--kind", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args)))
        return
    model = build_model(OUT / f"llama-{args.hidden}x{args.layers}", args.hidden, args.layers)
    only = set(filter(None, args.only.split(",")))
    results = []
    for label, method, optim in METHODS:
        if only and label.split()[0] not in only:
            continue
        for kind in ("causal_lm", "scalar"):
            cmd = [
                sys.executable,
                "-m",
                "bench.peft_methods",
                "--one",
                "--model",
                str(model),
                "--method",
                method,
                "--optim",
                optim,
                "--kind",
                kind,
                "--steps",
                str(args.steps),
                "--seq",
                str(args.seq),
                "--batch",
                str(args.batch),
                "--threads",
                str(args.threads),
                "--extra",
                args.extra,
            ]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            row = {"label": label, "method": method, "optim": optim, "kind": kind}
            found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if found:
                row |= json.loads(found[-1][7:])
            else:
                row["error"] = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
            results.append(row)
            print(
                f"{label:24s} {kind:9s} "
                + (
                    f"{row.get('peak_rss_mb', 0):7.0f} MB  {row.get('step_s', 0):6.2f} s/step  "
                    f"loss {row.get('loss_first', 0):.3f} -> {row.get('loss_last', 0):.3f}"
                    if "error" not in row
                    else row["error"]
                ),
                flush=True,
            )
    import torch

    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "threads": args.threads,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }
    shape = {"hidden": args.hidden, "layers": args.layers, "steps": args.steps, "seq": args.seq, "batch": args.batch}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = table(results, args.steps)
    out.with_suffix(".json").write_text(json.dumps({"machine": machine, "shape": shape, "results": results}, indent=1))
    out.with_suffix(".md").write_text(f"{machine}\n{shape}\n\n{md}\n")
    print(md)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
