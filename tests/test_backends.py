"""The watch on a run's tracking servers (`flows/launch/backends.py`) and the server's database
reasons, without a server: a local HTTP server that answers 200, then 500, then nothing."""

import http.server
import threading
import time

import pytest

from flows.launch import backends
from flows.ops.server import refusal


class _Flaky(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (the handler's API)
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def test_answer_tells_a_working_server_from_a_failing_or_silent_one(flaky):
    url = f"http://127.0.0.1:{flaky.server_port}/ready"
    _Flaky.status = 200
    assert backends.answer(url) is None
    _Flaky.status = 404  # a missing experiment: the database answered
    assert backends.answer(url) is None
    _Flaky.status = 500
    assert backends.answer(url) == "HTTP 500"
    assert "refused" in backends.answer("http://127.0.0.1:9/ready").lower()


def test_the_watch_gives_up_after_give_up_s_naming_the_service(flaky, monkeypatch):
    given: list[str] = []
    monkeypatch.setattr(backends.BackendWatch, "_give_up", lambda self, failure: given.append(failure))
    _Flaky.status = 500
    services = backends.probes(None, f"http://127.0.0.1:{flaky.server_port}", "alignflow")
    t0 = time.monotonic()
    with backends.BackendWatch(services, give_up_s=1.0, every_s=0.1):
        while not given and time.monotonic() - t0 < 10:
            time.sleep(0.05)
    assert given and "the MLflow server at http://127.0.0.1:" in given[0] and "1 s (HTTP 500)" in given[0]
    assert 1.0 <= time.monotonic() - t0 < 5


def test_the_watch_forgives_a_server_that_comes_back(flaky, monkeypatch):
    given: list[str] = []
    monkeypatch.setattr(backends.BackendWatch, "_give_up", lambda self, failure: given.append(failure))
    services = backends.probes(None, f"http://127.0.0.1:{flaky.server_port}", "alignflow")
    with backends.BackendWatch(services, give_up_s=1.0, every_s=0.1):
        for status in (500, 200) * 4:  # never down for a whole second
            _Flaky.status = status
            time.sleep(0.4)
    assert given == []


def test_client_retries_are_bounded_unless_the_user_chose(monkeypatch):
    env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "9"}
    backends.bounded_clients(env)
    assert env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "9" and env["PREFECT_CLIENT_MAX_RETRIES"] == "2"


def test_the_databases_own_refusal_is_kept():
    message = (
        'connection failed: connection to server at "127.0.0.1", port 5433 failed: FATAL:  password '
        'authentication failed for user "alignflow"\nMultiple connection attempts failed. All failures were:'
    )
    assert refusal(Exception(message)) == 'FATAL:  password authentication failed for user "alignflow"'


def test_an_error_is_put_down_to_a_server_only_when_one_is_down(flaky):
    from stages.runtime.errors import ConfigError

    _Flaky.status = 200
    watch = backends.BackendWatch(backends.probes(None, f"http://127.0.0.1:{flaky.server_port}", "x"), 60)
    assert watch.explains(RuntimeError("a bug")) is None  # the servers answer: the bug's traceback shows
    _Flaky.status = 500
    assert "the MLflow server at http://127.0.0.1:" in watch.explains(RuntimeError("the client gave up"))
    assert watch.explains(ConfigError("stage.ppo.beta")) is None and watch.explains(SystemExit(1)) is None
    assert backends.BackendWatch({}, 60).explains(RuntimeError("local run")) is None
