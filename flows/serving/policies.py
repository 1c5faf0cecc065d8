"""Which policy a served, chatted-with or exported model is: the registry's champion, an MLflow model
URI, or a model folder. `export`, `serve_model` and `chat` all take `--source` and resolve it here.

    champion                 the alias `champion` of --model-name (the promotion gate's choice)
    models:/NAME@ALIAS       any alias of any registered model
    models:/NAME/VERSION     one version
    PATH                     a policy artifact or any `from_pretrained` folder

The registry is the tracking server of `--tracking-uri`, else `MLFLOW_TRACKING_URI` (what
`tracking=server` runs use), else the SQLite store under `--artifacts-dir` (the embedded default).
A version's source is the policy artifact folder the gate registered; its tags carry the lineage.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import flows
from stages.runtime.errors import ExpectedFailure

MODEL_NAME = "alignflow-policy"  # RegistryConfig.model_name's default
URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


class SourceError(ExpectedFailure, ValueError):
    """A source that names no usable policy: the source and why."""


@dataclass
class Policy:
    folder: Path
    label: str  # how it was named: "alignflow-policy version 3 (champion)" or the folder
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def lineage(self) -> dict[str, Any]:
        return json.loads(self.tags.get("alignflow.lineage") or "{}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", default="champion", help="champion | models:/NAME@ALIAS | models:/NAME/N | PATH")
    parser.add_argument("--artifacts-dir", default=str(flows.ROOT / "artifacts"))
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    parser.add_argument("--model-name", default=MODEL_NAME, help="registered model that `champion` names")
    parser.add_argument("--device", default="auto", help="auto (a GPU where there is one) | cpu | cuda | cuda:N")


def tracking_uri(args: argparse.Namespace) -> str:
    if args.tracking_uri:
        return args.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(args.artifacts_dir).resolve()}/mlflow.db"


def resolve(args: argparse.Namespace) -> Policy:
    source = args.source
    if source == "champion":
        return _version(args, args.model_name, alias="champion", version=None)
    match = URI.match(source)
    if match:
        return _version(args, match["name"], alias=match["alias"], version=match["version"])
    if source.startswith("models:/"):
        raise SourceError(f"--source {source}: not a model URI; use models:/NAME@ALIAS or models:/NAME/VERSION")
    folder = Path(source)
    if not folder.is_dir():
        raise SourceError(f"--source {source}: no such folder (nor champion or a models:/ URI)")
    return Policy(folder.resolve(), str(folder))


def load(policy: Policy, *, threads: int = 0, trust_remote_code: bool = False, device: str = "cpu"):
    """(model, tokenizer, context window) of a policy folder, the model on `device` ("auto": the GPU
    where there is one); a template-less tokenizer gets the default chat template (its markers added
    to the vocabulary). `threads`: torch's, 0 for its default."""
    import torch

    from stages.data.tokens import ensure_chat_template
    from stages.models.compute import pick_device
    from stages.models.folders import inspect_model
    from stages.models.modeling import load_causal_lm, model_context

    if threads:
        torch.set_num_threads(threads)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SourceError(f"--device {device}: this machine has no CUDA device; use --device cpu or auto")
    # preflight's own checks: config, safetensors weights and their headers, architecture, tokenizer
    tokenizer = inspect_model(policy.folder, key="--source", trust_remote_code=trust_remote_code)
    try:
        model = load_causal_lm(policy.folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, RuntimeError) as e:  # weights whose body is cut short or corrupt
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SourceError(f"--source {policy.folder}: its weights do not load: {first}") from None
    if ensure_chat_template(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    return model.to(pick_device(device)), tokenizer, model_context(policy.folder, trust_remote_code=trust_remote_code)


def _version(args: argparse.Namespace, name: str, *, alias: str | None, version: str | None) -> Policy:
    uri = tracking_uri(args)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise SourceError(f"--source {args.source}: no registry at {uri}; run `make align` first, or pass a folder")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        if alias is not None:
            found = client.get_model_version_by_alias(name, alias)
        else:
            found = client.get_model_version(name, version)
    except MlflowException:
        what = f"alias {alias!r}" if alias is not None else f"version {version}"
        raise SourceError(f"--source {args.source}: {name} has no {what} in {uri}") from None
    suffix = f" ({alias})" if alias else ""
    label = f"{name} version {found.version}{suffix}"
    return Policy(_folder(args, found, uri), label, dict(found.tags))


def _folder(args: argparse.Namespace, found, uri: str) -> Path:
    """The version's policy folder: the local artifact where this machine has it, else a download of
    the copy in the tracking server's artifact store (kept under <artifacts>/.downloads)."""
    for where in (found.tags.get("alignflow.folder"), found.source):
        if where and not where.startswith(("runs:/", "models:/", "mlflow-artifacts:")) and Path(where).is_dir():
            return Path(where)
    if not found.source.startswith(("runs:/", "models:/", "mlflow-artifacts:", "s3://", "gs://", "http")):
        raise SourceError(f"--source {args.source}: version {found.version}'s folder {found.source} no longer exists")
    import shutil
    import tempfile

    import mlflow

    cache = Path(args.artifacts_dir).resolve() / ".downloads" / f"{found.name}-v{found.version}"
    if not cache.is_dir():
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
        try:
            mlflow.set_tracking_uri(uri)
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=found.source, dst_path=str(tmp)))
            got.rename(cache)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return cache
