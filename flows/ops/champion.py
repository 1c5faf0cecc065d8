"""`make champion`: the registry's champion policy and its lineage (data digests, SFT and reward-model
artifacts, overrides, MLflow run), and the versions that were not promoted, with why.

    python -m flows.ops.champion [artifacts_dir=... registry.model_name=...]
"""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig

import flows  # noqa: F401  (environment: telemetry off)
from flows.config import Config, register, to_config

register()


def describe(cfg: Config) -> str:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from flows.results.registry import CHAMPION
    from flows.runner import set_up_tracking

    set_up_tracking(cfg)
    client, name = MlflowClient(), cfg.registry.model_name
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return f"no champion: no version of {name} has been promoted in {client.tracking_uri}"
    tags = champion.tags
    lineage = json.loads(tags.get("alignflow.lineage", "{}"))
    lines = [
        f"champion: {name} version {champion.version}  ({tags.get('alignflow.reason', '')})",
        f"  source         {champion.source}",
        f"  {tags.get('alignflow.metric')}  {tags.get('metric.' + tags.get('alignflow.metric', ''), '')}"
        f"   KL/token {float(tags.get('alignflow.kl_to_sft', 'nan')):.3f}",
        f"  MLflow run     {lineage.get('mlflow_run_id')}  (pipeline {lineage.get('pipeline')})",
        f"  overrides      {' '.join(lineage.get('overrides') or []) or '(defaults)'}",
    ]
    lines += [f"  data           {k.removeprefix('file:')} sha256 {v[:16]}" for k, v in lineage["data_digests"].items()]
    artifacts = lineage.get("artifacts", [])
    if isinstance(artifacts, dict):  # versions registered before the lineage kept the pipeline's order
        artifacts = [{"stage": k, **v} for k, v in artifacts.items()]
    for art in artifacts:  # in the pipeline's order
        lines.append(f"  {art['stage']:<14} {art['digest'][:16]}  {art['path']}")
    others = [v for v in client.search_model_versions(f"name='{name}'") if v.version != champion.version]
    for v in sorted(others, key=lambda v: int(v.version)):
        lines.append(f"version {v.version}: {v.tags.get('alignflow.reason', '')}")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=str(flows.ROOT / "conf"), config_name="config")
def main(dcfg: DictConfig) -> None:
    print(describe(to_config(dcfg)))


if __name__ == "__main__":
    main()
