"""`make bench-lengths`: how many rows each stage cuts and drops on the real datasets in ../shared/data,
under the default length limits, for the tokenizers and context windows a first run is likely to have.

A row is cut when it is longer than the stage's limits (the prompt keeps its end, the response its
start); a ranking is dropped when its responses become identical once cut (nothing to learn). The
default `data.max_dropped_fraction` is chosen from these figures: above the largest fraction a
default run drops on any of them, and low enough that a misconfigured limit (a context far too
short for the data) still stops the run with the keys to raise.

    python -m bench.length_defaults   # artifacts/bench/length_defaults.json and .md
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
OUT = ROOT / "artifacts" / "bench"
DATASETS = {  # name: (DatasetConfig fields)
    "hh_rlhf_pairs": {"path": "data/hh-rlhf/harmless-base_test.jsonl.gz", "kind": "preferences", "format": "hh"},
    "alpaca_demo": {"path": "data/llamafactory-demo/alpaca_en_demo.json", "kind": "demonstrations", "format": "alpaca"},
    "sharegpt_pairs": {
        "path": "data/llamafactory-demo/dpo_en_demo.json",
        "kind": "preferences",
        "format": "sharegpt_pairs",
    },
}
CONTEXTS = (128, 256, 512, 1024)


def tokenizers():
    from transformers import GPT2TokenizerFast, LlamaTokenizer

    from stages.data.tokens import ensure_chat_template

    gpt2 = GPT2TokenizerFast.from_pretrained(str(SHARED / "tokenizers" / "gpt2"))
    sp_dir = OUT / "tok512"
    sp_dir.mkdir(parents=True, exist_ok=True)
    model = SHARED / "tokenizers" / "tok512-sentencepiece" / "tok512.model"
    (sp_dir / "tokenizer.model").write_bytes(model.read_bytes())
    sp = LlamaTokenizer.from_pretrained(str(sp_dir))
    for tok in (gpt2, sp):
        ensure_chat_template(tok)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    return {"gpt2 (50k BPE)": gpt2, "tok512 (SentencePiece)": sp}


def rows_of(name: str) -> tuple[list[dict], list[dict]]:
    """(demonstrations, rankings) of a dataset through the data worker."""
    from stages.data.reader import load
    from stages.settings.data import DatasetConfig

    spec = DATASETS[name]
    records = load(DatasetConfig(path=str(SHARED / spec["path"]), kind=spec["kind"], format=spec["format"])).rows
    if spec["kind"] == "demonstrations":
        return records, []
    rankings = [
        {"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"]], "ranks": [0, 1], "finished": [True, True]}
        for r in records
    ]
    demos = [{"messages": _as_messages(r["prompt"]) + [{"role": "assistant", "content": r["chosen"]}]} for r in records]
    return demos, rankings


def _as_messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def measure() -> list[dict]:
    from stages.data.tokens import fit_rows, resolve_budget
    from stages.preference.rankings import encode_rankings
    from stages.sft import encode_demonstrations

    out = []
    toks = tokenizers()
    for name in DATASETS:
        demos, rankings = rows_of(name)
        for tok_name, tok in toks.items():
            enc_demos = encode_demonstrations(tok, demos)
            enc_rank = encode_rankings(tok, rankings) if rankings else []
            for context in CONTEXTS:
                for stage, rows in (("sft", enc_demos), ("reward_model", enc_rank)):
                    if not rows:
                        continue
                    fitted = fit_rows(rows, resolve_budget(stage, None, None, context), stage=stage,
                                      max_dropped_fraction=1.0)  # fmt: skip
                    out.append({
                        "dataset": name, "tokenizer": tok_name, "context": context, "stage": stage,
                        "rows": len(rows), "cut": fitted.truncated, "dropped": fitted.dropped,
                        "dropped_fraction": fitted.dropped / len(rows),
                    })  # fmt: skip
    return out


def main() -> None:
    rows = measure()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "length_defaults.json").write_text(json.dumps(rows, indent=2))
    lines = ["| dataset | tokenizer | context | stage | rows | cut | dropped (fraction) |"]
    lines.append("|---|---|---:|---|---:|---:|---:|")
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['tokenizer']} | {r['context']} | {r['stage']} | {r['rows']} | {r['cut']} | "
            f"{r['dropped']} ({r['dropped_fraction']:.2%}) |"
        )
    (OUT / "length_defaults.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
