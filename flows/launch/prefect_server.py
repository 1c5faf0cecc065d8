"""The Prefect server a run records itself on: one prestarted for a sweep or a run that must compute
(`prestart`), the one a run chooses (`choose`: PREFECT_API_URL, `make serve`'s, a temporary one, or
none for a fully cached rerun) and the waits on its health check (`ping`, `wait_for_url`)."""

from __future__ import annotations

import os
from pathlib import Path

import flows


def prestart():
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
        preexec_fn=flows.die_with_parent,
    )
    atexit.register(proc.terminate)
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    os.environ["ALIGNFLOW_PRESTARTED_SERVER"] = "1"  # child processes (sweep jobs) wait on the same server
    return lambda: wait_for_server(proc)


def choose(*, must_run, local: str) -> bool:
    """Which Prefect server records this run; call before the first flow. A server named by
    PREFECT_API_URL (or prestarted for a sweep) is used; else one answering at `local` (`make serve`'s,
    `schedule.api_url`) is reused; else a temporary one starts when `must_run()` (a stage must run;
    asked only then, as it walks the branch's cache keys).
    False: no server, and none needed, as for a rerun whose every stage is cached, which then records
    itself in MLflow only (starting a server would take most of its time)."""
    if os.environ.get("PREFECT_API_URL"):
        wait_for_server()
        return True
    try:
        ping(local)
        url = local
    except OSError:
        if not must_run():
            return False
        prestart()()
        url = os.environ["PREFECT_API_URL"]
    os.environ["PREFECT_API_URL"] = url  # child processes (launched stages) report there too
    refresh_settings()
    return True


def refresh_settings() -> None:
    """Prefect reads its settings (PREFECT_API_URL) from the environment when first imported; after the
    environment changed, a process that imported it already must ask it to read them again."""
    import sys

    if "prefect.context" in sys.modules:
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()


def wait_for_server(proc=None) -> None:
    """Block until the Prefect server this process tree prestarted answers; no-op for a server given by
    PREFECT_API_URL. `proc`: the server process, when this process started it (its exit is an error)."""
    if os.environ.get("ALIGNFLOW_PRESTARTED_SERVER"):
        wait_for_url(os.environ["PREFECT_API_URL"], proc)


def ping(url: str) -> None:
    """Raises OSError unless the Prefect API at `url` answers its health check."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
        if response.status != 200:
            raise OSError(f"{url}/health answered {response.status}")


def wait_for_url(url: str, proc=None) -> None:
    import time

    deadline = time.monotonic() + float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with code {proc.returncode} before answering")
        try:
            ping(url)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(
        f"the Prefect server at {url} did not answer within PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
    )
