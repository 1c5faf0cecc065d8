import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path


def pin_worker_to_its_core() -> None:
    """`make test` runs the suite on pytest-xdist workers, one per core: each worker is pinned to its
    own core, so its torch (and every flow or stage process it starts, which reads the affinity for its
    thread count) uses one thread and never contends with the other worker. This runs before anything
    imports torch; torch's thread pools are sized again below in case a plugin imported it first
    (OMP_NUM_THREADS set after torch's import changes nothing)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    cores = sorted(os.sched_getaffinity(0))
    core = cores[int(os.environ["PYTEST_XDIST_WORKER"].removeprefix("gw")) % len(cores)]
    os.sched_setaffinity(0, {core})
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"


pin_worker_to_its_core()

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flows  # noqa: E402,F401  (project-local Prefect home, telemetry off)
from flows.launch import prefect_server  # noqa: E402
from flows.launch.launch import free_port  # noqa: E402,F401  (for the orchestration tests)


def size_torch_threads_to_the_cores() -> None:
    """torch's intra- and inter-op pools as large as this process's cores, never larger."""
    import torch

    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    if torch.get_num_interop_threads() != cores:
        try:
            torch.set_num_interop_threads(cores)
        except RuntimeError:  # already used: only possible if a plugin ran parallel work first
            pass


size_torch_threads_to_the_cores()

SHARED = ROOT.parent / "shared"

# Every stage a test runs through the flows (and every rank it launches) runs under the device guard
# (stages/runtime/device_guard.py): a tensor made without `device=` or an op across devices fails it.
os.environ["ALIGNFLOW_DEVICE_GUARD"] = "1"


def embedded_tuning(stage: str) -> dict:
    """`stage`'s keys in the embedded default's preset (conf/preset/embedded.yaml): what a stage test on the
    tiny embedded model trains with, where the schema's defaults are a real model's."""
    import yaml

    preset = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf" / "preset" / "embedded.yaml").read_text())
    return dict(preset["stage"].get(stage, {}))


def need_shared(path: Path) -> Path:
    """`path` under ../shared (real data, real tokenizers). Absent: the test skips on a developer's
    checkout without it, and fails under CI (`CI=true`), which always has it."""
    if not path.exists():
        message = f"{path} is absent: the shared data and tokenizers ship beside the checkout"
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def tiny_prepare(tmp_path_factory):
    """A prepared embedded task with small sizes: data, tokenizer and a briefly pretrained tiny Llama."""
    from stages import prepare
    from stages.settings.models import ModelConfig

    out = tmp_path_factory.mktemp("prepare")
    data = prepare.DataConfig(
        n_demonstrations=600,
        n_comparison_prompts=120,
        n_heldout_comparison_prompts=40,
        n_ppo_prompts=128,
        n_eval_prompts=64,
    )
    model = ModelConfig(hidden_size=32, intermediate_size=64, pretrain_documents=600, pretrain_epochs=2)
    return prepare.run(data, model, out_dir=out)


@pytest.fixture(scope="session")
def tiny_comparisons(tiny_prepare, tmp_path_factory):
    """K = 3 sampled responses per prompt of the tiny prepared task, ranked by the simulated labeler."""
    from stages import comparisons
    from stages.settings.labeling import LabelerConfig

    p = tiny_prepare
    return comparisons.run(
        comparisons.ComparisonsConfig(k=3, max_new_tokens=8),
        LabelerConfig(),
        policy=p.file("base"),
        prompts=p.file("comparison_prompts"),
        heldout_prompts=p.file("heldout_comparison_prompts"),
        target_len=6,
        out_dir=tmp_path_factory.mktemp("cmp"),
    )


@pytest.fixture(scope="session")
def tiny_reward_model(tiny_prepare, tiny_comparisons, tmp_path_factory) -> str:
    """The folder of a reward model trained 1 epoch on the tiny task's comparisons: what PPO tests score with."""
    from stages import reward_model

    return reward_model.run(
        reward_model.RewardModelConfig(epochs=1),
        policy=tiny_prepare.file("base"),
        comparisons=tiny_comparisons.file("comparisons"),
        heldout=tiny_comparisons.file("heldout_comparisons"),
        out_dir=tmp_path_factory.mktemp("rm"),
    ).path


def run_tiny_ppo(cfg, prepared, rm_dir, out: Path, checkpoint_dir: Path | None = None):
    """The PPO stage in this process, full fine-tuning, on the tiny prepared task and `rm_dir`'s reward model."""
    from stages import ppo
    from stages.settings.models import PeftConfig, Tuning

    return ppo.run(
        cfg,
        Tuning(PeftConfig("full")),
        policy=prepared.file("base"),
        reward_model=Path(rm_dir, "model"),
        normalization=Path(rm_dir, "normalization.json"),
        prompts=prepared.file("ppo_prompts"),
        out_dir=out,
        checkpoint_dir=checkpoint_dir,
    )


# The PPO stage in a process of its own (to be killed): argv the config keys beside the defaults below as
# JSON, the prepared folder, the reward model's, out and the checkpoint folder; prints its manifest's metrics.
PPO_STAGE_SCRIPT = """
import json, sys
from pathlib import Path
import flows  # telemetry off
from stages import ppo
from stages.settings.models import PeftConfig, Tuning
p, rm, out, ck = (Path(a) for a in sys.argv[2:6])
keys = {"updates": 6, "rollouts_per_update": 16, "minibatch_size": 8, "checkpoint_every": 2, **json.loads(sys.argv[1])}
m = ppo.run(ppo.PpoConfig(**keys), Tuning(PeftConfig("full")), policy=p / "base", reward_model=rm / "model",
            normalization=rm / "normalization.json",
            prompts=p / "ppo_prompts.jsonl", out_dir=out, checkpoint_dir=ck)
print("MANIFEST " + json.dumps(m.metrics))
"""


@pytest.fixture(scope="session")
def shared_tiny_run(tmp_path_factory) -> tuple[Path, dict]:
    """`alignflow align +experiment=tiny` once for the whole session, every xdist worker included (a file
    lock under the session's shared temporary folder): (its artifacts folder, the first run's summary).
    Tests that only read that run, or rerun it cached, share it instead of computing it again."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the workers' common folder
    art, record = shared / "shared-tiny-run", shared / "shared-tiny-run.json"
    with FileLock(str(shared / "shared-tiny-run.lock")):
        if not record.exists():
            alignflow = str(Path(sys.executable).with_name("alignflow"))
            done = subprocess.run([alignflow, "align", "+experiment=tiny", f"artifacts_dir={art}"], cwd=ROOT,
                                  capture_output=True, text=True, timeout=900)  # fmt: skip
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            record.write_text(done.stdout.rsplit("summary: ", 1)[1].strip())
    return art, json.loads(Path(record.read_text()).read_text())


def refusal_in_process(*overrides: str) -> str:
    """The one `error:` line `alignflow align <overrides>` prints for a run it refuses before any compute,
    found in this process by the same steps (Hydra's composition, `to_config`, preflight: what
    `flows.align.job` runs before a stage), without starting a process. How the console shows it (exit
    code 1, one line, no traceback) is checked in a real process once per kind of failure."""
    from hydra import compose, initialize_config_dir

    from flows.config import register, to_config
    from flows.pipeline import check_before_compute
    from stages.runtime.errors import ExpectedFailure

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        dcfg = compose("config", overrides=list(overrides))
    try:
        check_before_compute(to_config(dcfg))
    except ExpectedFailure as e:
        return f"error: {e}".splitlines()[0]
    pytest.fail(f"not refused: {' '.join(overrides)}")


def kill_after_checkpoint(args: list[str], ready) -> None:
    """Start a stage script, SIGKILL it once `ready()` (a complete checkpoint exists)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while not ready():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def finish(args: list[str]) -> dict:
    """Run a stage script to the end; the metrics of its `MANIFEST {json}` line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.split("MANIFEST ", 1)[1])


# Each test's seconds in the last full run (setup and call), committed: `make test` starts the longest
# first, which keeps both xdist workers busy to the end (a long test started last leaves one core idle).
# `make test-durations` (or ALIGNFLOW_RECORD_DURATIONS=<file> on any run) writes it anew.
DURATIONS = Path(__file__).with_name("durations.json")
NEW_SLOW_TEST_S, NEW_FAST_TEST_S = 60.0, 1.0  # a test the file does not know yet
_recorded: dict[str, float] = {}


def pytest_collection_modifyitems(config, items):
    known = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}

    def expected(item) -> float:
        default = NEW_SLOW_TEST_S if "slow" in item.keywords else NEW_FAST_TEST_S
        return known.get(item.nodeid, default)

    items[:] = longest_first_per_worker(sorted(items, key=expected, reverse=True))
    if os.environ.get("CUDA_VISIBLE_DEVICES") is None and not cuda_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="needs CUDA; none on this machine"))


def longest_first_per_worker(ranked: list) -> list:
    """xdist's worksteal hands each worker a contiguous share of the list and lets an idle one steal
    the end of another's: dealing the ranked tests round-robin into those shares starts every worker
    on its longest, and what is stolen last is short."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return [item for w in range(workers) for item in ranked[w::workers]]


def pytest_configure(config):
    """One Prefect server for the session's flows: started by the controller (or the only process)
    before the workers, which inherit PREFECT_API_URL; flows wait for it on first use. Tests about
    starting or finding a server remove PREFECT_API_URL and ALIGNFLOW_PRESTARTED_SERVER from their
    children's environment. `make test-fast` runs no flow that records a run: it starts none."""
    if os.environ.get("PYTEST_XDIST_WORKER") or os.environ.get("PREFECT_API_URL"):
        return
    if "not slow" in (config.option.markexpr or ""):
        return
    prefect_server.prestart()


def without_session_server(env: dict | None = None) -> dict:
    """`env` (default: this process's) without the session's Prefect server."""
    drop = ("PREFECT_API_URL", "ALIGNFLOW_PRESTARTED_SERVER")
    return {k: v for k, v in (env or os.environ).items() if k not in drop}


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_runtest_logreport(report):
    if os.environ.get("ALIGNFLOW_RECORD_DURATIONS") and report.when in ("setup", "call"):
        _recorded[report.nodeid] = _recorded.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session):
    target = os.environ.get("ALIGNFLOW_RECORD_DURATIONS")
    if target and _recorded and not os.environ.get("PYTEST_XDIST_WORKER"):  # the controller has every report
        Path(target).write_text(json.dumps({k: round(v, 2) for k, v in sorted(_recorded.items())}, indent=0) + "\n")


def build_tiny_model(
    folder: Path,
    arch: str,
    *,
    context: int = 256,
    tokenizer=None,
    safetensors: bool = True,
    hidden: int = 32,
    intermediate: int = 64,
) -> Path:
    """A small model of a real architecture with GPT-2's real tokenizer, saved with `save_pretrained`
    the way a downloaded model folder looks (no chat template, no pad token)."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM

    gpt2 = SHARED / "tokenizers" / "gpt2"
    if tokenizer is None:
        need_shared(gpt2)
    tok = tokenizer or GPT2TokenizerFast.from_pretrained(str(gpt2))
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    if arch == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=context, **ids)
        )
    else:
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=context,
            tie_word_embeddings=True,
            **ids,
        )
        model = LlamaForCausalLM(config)
    if safetensors:
        model.save_pretrained(folder)
    else:  # a pickled checkpoint, as older model folders ship
        import torch

        folder.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    tok.save_pretrained(folder)
    return folder


class Child:
    """A long-lived child process (a server, a deployment, workers) for orchestration tests: its output
    is drained by a thread (a full pipe would block it) and its last lines kept; a wait that runs out or
    a child that dies fails the test with them; leaving the block stops its whole process group."""

    def __init__(self, command: list[str], *, env: dict | None = None, lines: int = 60) -> None:
        self.command = command
        self.proc = subprocess.Popen(
            command, cwd=ROOT, env=env or os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )  # fmt: skip
        self.tail: collections.deque[str] = collections.deque(maxlen=lines)
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.tail.append(line.rstrip())
            self.seen.append(line.rstrip())

    def last_lines(self) -> str:
        return "\n".join(self.tail)

    def fail(self, why: str):
        pytest.fail(f"{' '.join(self.command[:3])}...: {why}; its last lines:\n{self.last_lines()}")

    def alive(self) -> None:
        if self.proc.poll() is not None:
            self.fail(f"exited with code {self.proc.returncode}")

    def wait_for(self, ready, timeout: float, what: str) -> None:
        """Poll `ready()` until true; the child's death or `timeout` seconds fail the test."""
        deadline = time.monotonic() + timeout
        while not ready():
            self.alive()
            if time.monotonic() > deadline:
                self.fail(f"no {what} within {timeout:.0f} s")
            time.sleep(0.5)

    def wait_for_line(self, predicate, timeout: float) -> str:
        found: list[str] = []
        self.wait_for(lambda: found.extend(l for l in list(self.seen) if predicate(l)) or found, timeout, "line")
        return found[0]

    def wait_for_url(self, url: str, timeout: float) -> None:
        def answers() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        self.wait_for(answers, timeout, f"answer at {url}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._reader.join(timeout=10)

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def send_json(handler, code: int, payload: bytes) -> None:
    """Answer an HTTP request of a test server with `payload` as JSON."""
    handler.send_response(code)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload)


class LocalHttpServer:
    """A threaded HTTP server on 127.0.0.1 for `handler` (an OpenAI-compatible stand-in): `url` ends
    in /v1; `close` stops it."""

    def __init__(self, handler) -> None:
        from http.server import ThreadingHTTPServer

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
