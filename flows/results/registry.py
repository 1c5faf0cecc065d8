"""The promotion gate: every evaluated policy becomes a model version in the MLflow registry; only one
that beats the champion becomes the champion.

After `evaluate`, the aligned policy's artifact folder is registered as a new version of
`registry.model_name` (`create_model_version` from the folder: MLflow 3's `register_model` wants a
logged model). It takes the alias `champion` when its `registry.metric` beats the champion's by more
than `registry.margin` and its KL to SFT per token is at most `registry.max_kl_per_token`; otherwise
`candidate`. Either way the version's tags say why (`alignflow.reason`) and carry its lineage: the
data digests, the SFT and reward-model artifacts, the overrides and the MLflow run. A policy already
registered (a cached rerun) is not registered twice. `make champion` prints the champion.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flows.config import Config, RegistryConfig

CHAMPION, CANDIDATE = "champion", "candidate"


def lookup(block: dict[str, Any], dotted: str) -> float | None:
    """`gold_policy.mean` of eval.json (or `eval.win_rate` of a summary), or None where the key is
    absent or not a number."""
    value: Any = block
    for part in dotted.split("."):
        if not isinstance(value, dict) or value.get(part) is None:
            return None
        value = value[part]
    return float(value) if isinstance(value, (int, float)) else None


def decide(
    value: float | None, kl: float, champion: float | None, reg: RegistryConfig, verdict: dict | None = None
) -> tuple[bool, str]:
    """(promoted, why) for a candidate with `value` of `reg.metric` and `kl` per token, against the
    champion's value (None: there is no champion yet). A run whose verdict is not "ok" (flagged: a
    bound crossed; inconclusive: its judge not shown valid) is never promoted."""
    if verdict is not None and verdict["status"] != "ok":
        first = verdict["reasons"][0] if verdict["reasons"] else ""
        return False, f"the run's verdict is {verdict['status']}: {first}"
    if value is None:
        return False, f"{reg.metric} is not in this run's evaluation, so it cannot be compared"
    if kl > reg.max_kl_per_token:
        return False, f"KL to SFT {kl:.3f}/token is above registry.max_kl_per_token {reg.max_kl_per_token}"
    if champion is None:
        return True, f"first version within the KL bound ({reg.metric} {value:.4g}, KL {kl:.3f}/token)"
    gain = (value - champion) if reg.higher_is_better else (champion - value)
    if gain > reg.margin:
        return True, f"{reg.metric} {value:.4g} beats the champion's {champion:.4g} by {gain:.4g} > margin {reg.margin}"
    return False, f"{reg.metric} {value:.4g} does not beat the champion's {champion:.4g} by more than {reg.margin}"


def lineage(cfg: Config, summary: dict[str, Any]) -> dict[str, Any]:
    stages = summary["stages"]
    data = {k: v for k, v in stages.get("prepare", {}).get("parents", {}).items() if k.startswith("file:")}
    return {
        "mlflow_run_id": summary["mlflow_run_id"],
        "pipeline": summary["pipeline"],
        "overrides": hydra_overrides(),
        "data_digests": data,
        "prepare_digest": stages.get("prepare", {}).get("digest"),
        "artifacts": [{"stage": name, "path": s["artifact"], "digest": s["digest"]} for name, s in stages.items()],
        "data_sources": (summary.get("data") or {}).get("prompt_source"),
    }


def hydra_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def gate(cfg: Config, summary: dict[str, Any]) -> dict[str, Any]:
    """Register the evaluated policy and move the aliases; returns what was done, and why."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    reg, client = cfg.registry, MlflowClient()
    evaluate = summary["stages"]["evaluate"]
    source, digest = evaluate["inputs"]["policy"], evaluate["parents"]["policy"]
    try:
        client.create_registered_model(reg.model_name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    versions = client.search_model_versions(f"name='{reg.model_name}'")
    known = next((v for v in versions if v.tags.get("alignflow.digest") == digest), None)
    if known is not None:
        return _record(reg, known.version, known.tags.get("alignflow.promoted") == "true", "", already=True)
    value, kl = lookup(summary["eval"], reg.metric), float(summary["eval"]["kl_to_sft"])
    champion = _champion(client, reg)
    promoted, why = decide(value, kl, champion[1] if champion else None, reg, summary.get("verdict"))
    tags = {
        "alignflow.digest": digest,
        "alignflow.promoted": str(promoted).lower(),
        "alignflow.reason": why,
        "alignflow.metric": reg.metric,
        f"metric.{reg.metric}": "" if value is None else repr(value),
        "alignflow.kl_to_sft": repr(kl),
        "alignflow.eval_json": str(Path(evaluate["artifact"], "eval.json")),
        "alignflow.lineage": json.dumps(lineage(cfg, summary), sort_keys=True),
    }
    folder = Path(source).resolve()
    tags["alignflow.folder"] = str(folder)
    if mlflow.get_tracking_uri().startswith(("http://", "https://")):
        # a tracking server: another machine cannot read this folder, so the version's source is a copy
        # in the server's artifact store (and the server accepts no local path as a source)
        client.log_artifacts(summary["mlflow_run_id"], str(folder), f"policy-{digest[:12]}")
        registered = f"runs:/{summary['mlflow_run_id']}/policy-{digest[:12]}"
    else:
        registered = str(folder)
    version = client.create_model_version(
        reg.model_name, source=registered, run_id=summary["mlflow_run_id"], tags=tags
    ).version
    client.set_registered_model_alias(reg.model_name, CHAMPION if promoted else CANDIDATE, version)
    record = _record(reg, version, promoted, why)
    if mlflow.active_run() is not None:
        mlflow.set_tags({f"alignflow.registry.{k}": str(v) for k, v in record.items()})
    return record


def _champion(client, reg: RegistryConfig) -> tuple[str, float | None] | None:
    """(version, its value of reg.metric) of the current champion, or None."""
    from mlflow.exceptions import MlflowException

    try:
        v = client.get_model_version_by_alias(reg.model_name, CHAMPION)
    except MlflowException:
        return None
    stored = v.tags.get(f"metric.{reg.metric}")
    if stored:
        return v.version, float(stored)
    eval_json = Path(v.tags.get("alignflow.eval_json", ""))  # gated on another metric: read its evaluation
    return v.version, lookup(json.loads(eval_json.read_text()), reg.metric) if eval_json.is_file() else None


def _record(reg: RegistryConfig, version: str, promoted: bool, why: str, *, already: bool = False) -> dict[str, Any]:
    return {
        "model": reg.model_name,
        "version": str(version),
        "alias": CHAMPION if promoted else CANDIDATE,
        "promoted": promoted,
        "reason": f"already registered as version {version}" if already else why,
    }


def describe(record: dict[str, Any]) -> str:
    verb = "promoted to champion" if record["promoted"] else "not promoted (candidate)"
    return f"registry: {record['model']} version {record['version']} {verb}: {record['reason']}"
