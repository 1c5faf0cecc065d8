"""`tracking=server`: the run's Prefect and MLflow servers watched, so a backend that stops answering
(its PostgreSQL killed, the host gone) ends the run in bounded time with one `error:` line naming it.

- The clients give up sooner (`bounded_clients`): MLflow's and Prefect's HTTP retries, which otherwise
  spend about twelve minutes on a dead server, are cut to two, each request to 15 s.
- `BackendWatch` probes both every 2 s with a call that needs their database (Prefect's `/ready`,
  MLflow's experiment lookup). A service that has not answered for `tracking.give_up_s` (default 60)
  stops the run as Ctrl-C would: the stage in progress publishes nothing, the stages that finished
  stay cached for the rerun, and no run is recorded as a success. Should stopping itself hang on the
  dead server, the watch ends the process `GRACE_S` later.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from stages.runtime.errors import ExpectedFailure

CLIENT_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
    "PREFECT_CLIENT_MAX_RETRIES": "2",
}
GRACE_S = 30.0


class BackendDown(ExpectedFailure, RuntimeError):
    """A tracking or orchestration server stopped answering."""


def bounded_clients(env=os.environ) -> None:
    """Fewer, shorter client retries (a value the user set is kept); before MLflow or Prefect is imported."""
    for name, value in CLIENT_LIMITS.items():
        env.setdefault(name, value)


def probes(prefect_api: str | None, mlflow_uri: str, experiment: str) -> dict[str, str]:
    """Each service's name and the URL whose answer needs its database."""
    found = {"MLflow server": f"{mlflow_uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?"
             + urllib.parse.urlencode({"experiment_name": experiment})}  # fmt: skip
    if prefect_api:
        found["Prefect server"] = f"{prefect_api.rstrip('/')}/ready"
    return found


UNREACHABLE = {"ConnectionError", "ConnectError", "ConnectTimeout", "ReadTimeout", "RemoteProtocolError",
               "MaxRetryError", "NewConnectionError", "PrefectHTTPStatusError"}  # fmt: skip


def unreachable(e: BaseException | None) -> bool:
    """Whether `e` (or what caused it) is a client that could not reach its server: requests', httpx's,
    urllib3's connection errors, MLflow's failed API request, Prefect's 5xx."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ConnectionError) or type(e).__name__ in UNREACHABLE:
            return True
        if type(e).__name__ == "MlflowException" and str(e).startswith("API request to"):
            return True
        e = e.__cause__ or e.__context__
    return False


def answer(url: str, timeout: float = 5.0) -> str | None:
    """None if `url` answered below 500; else why not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return None
    except urllib.error.HTTPError as e:
        return None if e.code < 500 else f"HTTP {e.code}"
    except (OSError, ValueError) as e:
        return str(getattr(e, "reason", e))


class BackendWatch:
    """A daemon thread probing `services` ({name: url}); see the module docstring."""

    def __init__(self, services: dict[str, str], give_up_s: float, every_s: float = 2.0) -> None:
        self.services, self.give_up_s, self.every_s = services, give_up_s, every_s
        self.failure: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="alignflow-backend-watch", daemon=True)

    def __enter__(self) -> BackendWatch:
        if self.services:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def explains(self, e: BaseException) -> str | None:
        """The dead server that explains `e`, if one does: the watch's own verdict, or for an error that
        is neither expected nor an exit, a probe now."""
        if self.failure is not None:
            return self.failure
        if not self.services or isinstance(e, (ExpectedFailure, SystemExit)):
            return None
        return self.down()

    def down(self) -> str | None:
        """Which service does not answer now, and why (None: both answer)."""
        for name, url in self.services.items():
            why = answer(url)
            if why is not None:
                return f"the {name} at {_site(url)} stopped answering ({why})"
        return None

    def _loop(self) -> None:
        failing_since: dict[str, float] = {}
        while not self._stop.wait(self.every_s):
            for name, url in self.services.items():
                why = answer(url)
                if why is None:
                    failing_since.pop(name, None)
                    continue
                since = failing_since.setdefault(name, time.monotonic())
                if time.monotonic() - since >= self.give_up_s:
                    self._give_up(f"the {name} at {_site(url)} has not answered for {self.give_up_s:.0f} s ({why}); "
                                  "the stages that finished are cached: rerun when it is back")  # fmt: skip
                    return

    def _give_up(self, failure: str) -> None:
        self.failure = failure
        os.kill(os.getpid(), signal.SIGTERM)  # stops the run as an interrupt does: nothing half-published
        if not self._stop.wait(GRACE_S):  # stopping hung on the dead server: end here, with the line
            print(f"error: {failure}", file=sys.stderr, flush=True)
            os._exit(1)


def _site(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"
