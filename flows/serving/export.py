"""`alignflow export`: a policy (the champion by default) as a plain Hugging Face folder, for users who
take the model elsewhere.

    alignflow export --out exported/ [--source champion|models:/NAME@ALIAS|PATH] [--no-mlflow]

The folder loads with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`:
weights as safetensors (the policy artifact is already merged: LoRA, DoRA, PiSSA and QLoRA adapters
are merged by the stage that trained them), the tokenizer with its chat template, and README.md, a
model card with the lineage the registry recorded (data digests, overrides, every stage artifact,
the evaluation figures and the verdict). Written beside `--out` and renamed, so a crash leaves no
half folder. Unless `--no-mlflow`, the folder is also logged to MLflow as a `transformers` model
(`mlflow models serve -m <uri>` serves it) and its model URI printed.

Houlsby-adapted policies are refused: their bottlenecks are extra modules that no stock
`from_pretrained` class builds, so no plain folder can hold them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import flows  # noqa: F401  (environment: telemetry off)
from flows.serving import policies
from stages.models import houlsby
from stages.runtime.errors import ExpectedFailure


def export(policy: policies.Policy, out: Path, *, trust_remote_code: bool = False, device: str = "cpu") -> Path:
    from stages.models.modeling import check_model_folder, save_tokenizer

    folder = policy.folder
    if (folder / houlsby.CONFIG).is_file():
        raise policies.SourceError(
            f"{folder}: a Houlsby-adapted policy; its bottleneck modules load only through alignflow's loader, "
            "so it has no plain from_pretrained form (train with peft=lora or peft=full to export)"
        )
    if (folder / "adapter_config.json").is_file() and not any(folder.glob("model*.safetensors")):
        raise policies.SourceError(f"{folder}: an adapter alone; export its stage's merged policy folder instead")
    check_model_folder(folder)
    out = Path(out).resolve()
    check_out(out)
    model, tokenizer, _ = policies.load(policy, trust_remote_code=trust_remote_code, device=device)  # + chat template
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise policies.SourceError(f"--out {out}: cannot write there: {e.strerror or e}") from None
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
        (tmp / "README.md").write_text(model_card(policy))
        (tmp / "alignflow-lineage.json").write_text(json.dumps(_provenance(policy), indent=2, sort_keys=True))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_out(out: Path) -> None:
    """Refuse, before the model loads, an `--out` that cannot become a new folder: a file, a folder
    that is not empty, a path under a file, or a place this user cannot write."""
    if out.is_file():
        raise policies.SourceError(f"--out {out}: is a file; give a new folder")
    if out.is_dir() and any(out.iterdir()):
        raise policies.SourceError(f"--out {out}: exists and is not empty; choose a new folder")
    parent = next(p for p in out.parents if p.exists())
    if not parent.is_dir():
        raise policies.SourceError(f"--out {out}: lies under {parent}, which is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise policies.SourceError(f"--out {out}: {parent} is not writable by this user")


def _evaluation(policy: policies.Policy) -> dict[str, Any]:
    eval_json = Path(policy.tags.get("alignflow.eval_json", ""))
    if not eval_json.is_file():  # exported from a folder, not a registered version
        return {}
    return json.loads(eval_json.read_text())


def _provenance(policy: policies.Policy) -> dict[str, Any]:
    return {
        "source": str(policy.folder),
        "label": policy.label,
        "registry": {k: v for k, v in policy.tags.items() if k != "alignflow.lineage"},
        "lineage": policy.lineage,
    }


def _figures(result: dict[str, Any]) -> list[str]:
    """Table rows of eval.json's headline figures: gold score of SFT and the policy (mean, 95% CI), win
    rates against SFT, KL to SFT per token, the evaluation judge's own accuracy."""
    rows = []
    for key in ("gold_sft", "gold_policy", "win_rate", "win_rate_lc", "kl_to_sft", "rm_accuracy"):
        value = result.get(key)
        if isinstance(value, dict) and isinstance(value.get("mean"), (int, float)):
            rows.append(f"| {key} | {value['mean']:.4g} ± {value.get('ci95', float('nan')):.2g} |")
        elif isinstance(value, (int, float)):
            rows.append(f"| {key} | {value:.4g} |")
    return rows


def model_card(policy: policies.Policy) -> str:
    lineage, tags = policy.lineage, policy.tags
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [alignflow, rlhf]",
        "---",
        "",
        f"# {policy.label}",
        "",
        "Aligned with alignflow (the InstructGPT recipe: SFT, reward model, "
        "PPO or a branch). Load it with `AutoModelForCausalLM.from_pretrained` and render prompts with "
        "`tokenizer.apply_chat_template`.",
        "",
        "## Lineage",
        "",
        f"- source folder: `{policy.folder}`",
    ]
    if not lineage:
        lines.append("- no registry lineage: exported from a folder, not from a registered version")
    else:
        lines += [
            f"- pipeline: `{lineage.get('pipeline')}`",
            f"- MLflow run: `{lineage.get('mlflow_run_id')}`",
            f"- overrides: `{' '.join(lineage.get('overrides') or []) or '(defaults)'}`",
            "",
            "| data | sha256 |",
            "|---|---|",
        ]
        lines += [f"| {k.removeprefix('file:')} | `{v}` |" for k, v in (lineage.get("data_digests") or {}).items()]
        lines += ["", "| stage | artifact digest | folder |", "|---|---|---|"]
        lines += [f"| {a['stage']} | `{a['digest']}` | `{a['path']}` |" for a in lineage.get("artifacts") or []]
    result = _evaluation(policy)
    if result or tags:
        lines += ["", "## Evaluation", ""]
        if tags.get("alignflow.reason"):
            verb = "promoted to champion" if tags.get("alignflow.promoted") == "true" else "not promoted"
            lines.append(f"Registry verdict: {verb}: {tags['alignflow.reason']}.")
        verdict = result.get("verdict") or {}
        if verdict:
            lines.append(f"Evaluation verdict: **{verdict.get('status')}**" + "".join(
                f"\n- {r}" for r in verdict.get("reasons") or []))  # fmt: skip
        figures = _figures(result)
        if figures:
            lines += ["", "| figure | value |", "|---|---|", *figures]
    return "\n".join(lines) + "\n"


def log_to_mlflow(folder: Path, policy: policies.Policy, uri: str, experiment: str) -> str:
    """Log `folder` as an MLflow `transformers` model (a text-generation pipeline) in a run of its own;
    returns its model URI. The requirements are given, not inferred: MLflow's inference imports
    packages (torchvision) that a text model does not need."""
    import mlflow
    import torch
    import transformers

    from stages.models.modeling import load_causal_lm, load_tokenizer

    pipe = transformers.pipeline("text-generation", model=load_causal_lm(folder), tokenizer=load_tokenizer(folder))
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}",
                    "safetensors", "tokenizers"]  # fmt: skip
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name="export"):
        mlflow.set_tags({"alignflow.export.source": str(policy.folder), "alignflow.export.label": policy.label})
        parent = policy.lineage.get("mlflow_run_id")
        if parent:
            mlflow.set_tag("alignflow.export.pipeline_run", parent)
        info = mlflow.transformers.log_model(transformers_model=pipe, name="model", pip_requirements=requirements)
    return info.model_uri


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="alignflow export", description=__doc__.split("\n\n")[0])
    policies.add_arguments(parser)
    parser.add_argument("--out", required=True, help="the folder to write (new or empty)")
    parser.add_argument("--experiment", default="alignflow", help="MLflow experiment of the export run")
    parser.add_argument("--no-mlflow", action="store_true", help="write the folder only")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--debug", action="store_true", help="show an expected failure's stack")
    args = parser.parse_args(argv)
    try:
        policy = policies.resolve(args)
        out = export(policy, Path(args.out), trust_remote_code=args.trust_remote_code, device=args.device)
        print(f"exported {policy.label} to {out}")
        if not args.no_mlflow:
            uri = log_to_mlflow(out, policy, policies.tracking_uri(args), args.experiment)
            print(f"logged to MLflow as {uri} (`mlflow models serve -m {uri}`)")
    except ExpectedFailure as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
