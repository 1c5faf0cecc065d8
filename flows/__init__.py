"""alignflow flows: Prefect wiring of the stages in `stages/`, configured with Hydra.

Importing this package pins the orchestration state inside the project and turns telemetry off,
before Prefect or MLflow are imported.
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

for _key, _value in {
    "PREFECT_HOME": str(ROOT / ".prefect"),
    "PREFECT_LOCAL_STORAGE_PATH": str(ROOT / ".prefect" / "results"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_API_HOST": "127.0.0.1",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # not its database set-up lines
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    # third-party progress bars ("Loading weights", "Writing model shards", dataset maps): the stages
    # show their own progress (stages/runtime/progress.py)
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    # DS_ACCELERATOR is left to DeepSpeed but for compute.device=cpu (`flows.launch.launch.accelerator_env`)
}.items():
    os.environ.setdefault(_key, _value)

import logging  # noqa: E402
import warnings  # noqa: E402

# deprecation notices of the libraries' own internals (transformers 5 renaming its arguments under trl),
# which a user cannot act on
warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|trl|peft|accelerate|torch)(\.|$)")

for _name in ("httpx", "httpcore", "alembic", "mlflow", "prefect"):
    logging.getLogger(_name).setLevel(logging.WARNING)
# urllib3's "Retrying (...) after connection broken": a tracking server that stopped answering is named
# by the run's one error line (flows/launch/backends.py)
logging.getLogger("urllib3").setLevel(logging.ERROR)
# bitsandbytes, imported by peft: "Failed to load CPU gemm_4bit_forward from kernels-community" (an
# optional faster kernel; its own CPU path runs) and its 8-bit matmul's fp16 cast notice
# torchao, imported by transformers' quantizers: its CUDA-only kernels fail to load on CPU ("Failed to
# load ..._C_cutlass_90a.abi3.so"), and torch notes its Enum registrations as deprecated; both harmless
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast", category=UserWarning)


def debugging() -> bool:
    """`--debug` or HYDRA_FULL_ERROR=1: an expected failure shows its stack, not one `error:` line."""
    return os.environ.get("ALIGNFLOW_DEBUG") == "1" or os.environ.get("HYDRA_FULL_ERROR") == "1"


def exit_now(code: int) -> None:
    """End a finished command without the interpreter's teardown, which frees torch's and MLflow's
    modules object by object: about 1 s on 2 cores, a fifth of a cached rerun. The exit handlers still
    run (logging's flush, the temporary Prefect server's stop, file locks). With another thread still
    alive (a sweep's joblib executor) it exits the ordinary way, which stops that thread first."""
    import atexit
    import sys
    import threading

    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if others:  # e.g. a sweep's joblib executor: the interpreter's own shutdown tells it to stop first
        raise SystemExit(code)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def die_with_parent() -> None:
    """In a child process (`preexec_fn`): Linux sends it SIGTERM when the process that started it dies,
    even by SIGKILL or by a signal that skips `atexit`, so no server outlives its run."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
