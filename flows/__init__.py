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
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
}.items():
    os.environ.setdefault(_key, _value)

import logging  # noqa: E402

for _name in ("httpx", "httpcore", "alembic", "mlflow", "prefect", "urllib3"):
    logging.getLogger(_name).setLevel(logging.WARNING)


def prestart_prefect_server():
    """Boot Prefect's temporary local server (127.0.0.1) in its own process, now.

    The same server Prefect would start on first use, started before torch, MLflow and Prefect
    import in this process so that both boots overlap. Returns a function that waits until the
    server answers; it is stopped when this process exits. Does nothing if PREFECT_API_URL is set.
    """
    import atexit
    import importlib.util
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    if os.environ.get("PREFECT_API_URL"):
        return lambda: None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    prefect_dir = Path(importlib.util.find_spec("prefect").origin).parent
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            str(prefect_dir.parent),
            "--factory",
            "prefect.server.api.server:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "error",
            "--lifespan",
            "on",
        ],
        env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"},
    )
    atexit.register(proc.terminate)
    url = f"http://127.0.0.1:{port}/api"
    os.environ["PREFECT_API_URL"] = url

    def wait() -> None:
        deadline = time.monotonic() + float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the Prefect server exited with code {proc.returncode} before answering")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(
            f"the Prefect server at {url} did not answer within PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
        )

    return wait
