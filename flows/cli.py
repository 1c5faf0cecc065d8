"""`alignflow`: one command for what users run, each subcommand a thin door to its module.

    alignflow align [overrides]          the whole recipe (`python -m flows.align` does the same)
    alignflow compare [overrides]        every branch from one SFT, one table
    alignflow frontier [--ppo-betas ...] reward-vs-KL frontier of PPO and DPO sweeps
    alignflow serve [overrides]          the Prefect deployment: cron schedule and new-data trigger
    alignflow notify PATH...             tell the deployment that a data file changed
    alignflow workers serve|sweep ...    a Prefect process pool with local workers; sweeps onto it
    alignflow champion [overrides]       the registry's champion and its lineage
    alignflow server [--dir .server]     PostgreSQL, a Prefect server and an MLflow server for a team
    alignflow serve-model [--source ...] the champion behind an OpenAI-compatible API on 127.0.0.1
    alignflow chat [--source ...]        a terminal chat with the champion (or any policy)
    alignflow export --out DIR           the champion (or --source) as a plain Hugging Face folder
    alignflow ui [--port N]              the MLflow UI on 127.0.0.1

Hydra overrides (`stage.ppo.beta=0.05 peft=full`, `-m` for a sweep) pass through unchanged. Only
argument parsing happens here: a subcommand imports its module when it runs, so `--help` is instant.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import flows

HYDRA_HELP = """
Hydra overrides pass through unchanged: `key=value` (stage.ppo.beta=0.05), a config group option
(peft=full, pipeline=dpo, data=files), `+experiment=tiny`, `-m` for a sweep. `--cfg job` prints the
composed config without running; `--hydra-help` lists Hydra's own flags. An expected failure (a
value out of range, a model folder, a data row, a judge) prints one `error:` line; `--debug` shows its stack."""


def _align(argv: list[str]) -> None:
    from flows import align

    align.run(argv)


def _hydra(module: str) -> Callable[[list[str]], None]:
    def call(argv: list[str]) -> None:
        import importlib

        sys.argv = [f"alignflow {module.rsplit('.', 1)[1]}", *argv]
        importlib.import_module(module).main()

    return call


def _argv(module: str) -> Callable[[list[str]], None]:
    def call(argv: list[str]) -> None:
        import importlib

        sys.argv[0] = f"alignflow {module.rsplit('.', 1)[1]}"  # argparse's prog in usage lines
        importlib.import_module(module).main(argv)

    return call


def _ui(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="alignflow ui", description=COMMANDS["ui"][0])
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--artifacts-dir", default=str(flows.ROOT / "artifacts"))
    args = parser.parse_args(argv)
    root = os.path.abspath(args.artifacts_dir)
    mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
    command = [mlflow, "ui", "--backend-store-uri", f"sqlite:///{root}/mlflow.db"]
    command += ["--default-artifact-root", f"{root}/mlflow-artifacts", "--host", "127.0.0.1", "--port", str(args.port)]
    raise SystemExit(subprocess.call(command))


# name: (one line of help, how it runs, whether its arguments are Hydra overrides)
COMMANDS: dict[str, tuple[str, Callable[[list[str]], None], bool]] = {
    "align": ("run the whole recipe (SFT -> reward model -> PPO, or a branch) on the composed config", _align, True),
    "compare": (
        "run every branch from one SFT and write one table (artifacts/compare/)",
        _argv("flows.studies.compare"),
        False,
    ),
    "frontier": ("sweep PPO and DPO beta and draw the reward-vs-KL frontier", _argv("flows.studies.frontier"), False),
    "serve": (
        "serve the align flow as a Prefect deployment: cron schedule and new-data trigger",
        _hydra("flows.ops.serve"),
        True,
    ),
    "notify": (
        "emit the new-data event for changed files, so the served deployment retrains",
        _argv("flows.ops.notify"),
        False,
    ),
    "workers": (
        "start a Prefect process pool with local workers, or submit a sweep to it",
        _argv("flows.ops.workers"),
        False,
    ),
    "champion": (
        "print the registry's champion policy, its lineage, and why others were not promoted",
        _hydra("flows.ops.champion"),
        True,
    ),
    "server": (
        "start PostgreSQL, a Prefect server and an MLflow server on it (127.0.0.1); Ctrl-C stops all three",
        _argv("flows.ops.server"),
        False,
    ),
    "serve-model": (
        "serve the champion (or --source) behind an OpenAI-compatible API on 127.0.0.1",
        _argv("flows.serving.openai_server"),
        False,
    ),
    "chat": ("chat in the terminal with the champion (or --source), streaming", _argv("flows.serving.chat"), False),
    "export": (
        "write the champion (or --source) as a plain Hugging Face folder with its model card",
        _argv("flows.serving.export"),
        False,
    ),
    "ui": ("serve the MLflow UI of the artifacts folder on 127.0.0.1", _ui, False),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (help_, _, _) in COMMANDS.items()]
    return (
        "usage: alignflow <command> [arguments]\n\ncommands:\n"
        + "\n".join(lines)
        + ("\n\n`alignflow <command> --help` for one command.")
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        raise SystemExit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        raise SystemExit(f"alignflow: no command {name!r}\n\n{usage()}")
    help_, run, hydra = COMMANDS[name]
    if hydra and rest[:1] in (["-h"], ["--help"]):
        print(f"usage: alignflow {name} [overrides]\n\n{help_}.\n{HYDRA_HELP}")
        raise SystemExit(0)
    run(rest)


if __name__ == "__main__":
    main()
