"""Every bad input refused before compute, in one `error:` line naming the key, folder or server.

The rules themselves on hand-picked values; a walk over every key of the composed config that fails
for a numeric key without a declared rule; 30 out-of-range overrides through the command line; the
model-folder cases (corrupt weights, an encoder, no tokenizer, a missing path); and a judge server
without logprobs, with invalid answers, and one that times out, each stopped by preflight's probe.
"""

import json
import os
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from conftest import LocalHttpServer, build_tiny_model, refusal_in_process, send_json

from flows.config import Config
from stages.runtime import rules
from stages.runtime.rules import COUNT, OPEN_UNIT, UNCONSTRAINED, UNIT, between, one_of

ROOT = Path(__file__).resolve().parents[1]
ALIGNFLOW = str(Path(sys.executable).with_name("alignflow"))


# ---------------------------------------------------------------- the rules, by hand


def test_rules_accept_their_bounds_and_name_what_is_wrong():
    assert UNIT.violation(0) is None and UNIT.violation(1) is None and UNIT.violation(None) is None
    assert UNIT.violation(1.5) == "must be in [0, 1], got 1.5"
    assert OPEN_UNIT.violation(0) == "must be in (0, 1), got 0" and OPEN_UNIT.violation(0.5) is None
    assert COUNT.violation(0) == "must be >= 1, got 0" and COUNT.violation(1) is None
    assert rules.POSITIVE.violation(0) == "must be > 0, got 0" and rules.POSITIVE.violation(1e-9) is None
    assert between(0, 0.5, high_open=True).violation(0.5) == "must be in [0, 0.5), got 0.5"
    assert one_of(4, 8).violation(5) == "must be one of 4, 8, got 5" and one_of(4, 8).violation(8) is None
    assert UNCONSTRAINED.violation(-1e9) is None
    assert UNCONSTRAINED.violation(float("nan")) == "must be a finite number, got nan"


def test_check_tree_names_the_full_key():
    rules.check_tree(Config, Config())  # the defaults are in range
    with pytest.raises(rules.ConfigError, match=r"^stage\.ppo\.lam: must be in \[0, 1\], got -0\.5$"):
        rules.check_tree(Config, _Node(Config(), {"stage": {"ppo": {"lam": -0.5}}}))
    with pytest.raises(rules.ConfigError, match=r"^labeler\.ai\.few_shot\[1\]\.preferred: must be one of 1, 2"):
        rules.check_tree(Config, _Node(Config(), {"labeler": {"ai": {"few_shot": [_Shot(1), _Shot(3)]}}}))


class _Shot:
    def __init__(self, preferred):
        self.preferred = preferred


class _Node:
    """A config with some values replaced, answering getattr like a DictConfig."""

    def __init__(self, base, changes):
        self.base, self.changes = base, changes

    def __getattr__(self, name):
        value = getattr(self.base, name)
        change = self.changes.get(name)
        if isinstance(change, dict):
            return _Node(value, change)
        return value if name not in self.changes else change


# ---------------------------------------------------------------- every key has a rule


def _composed(*overrides: str):
    from hydra import compose, initialize_config_dir

    from flows.config import register

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _leaves(node, prefix=""):
    from omegaconf import DictConfig, ListConfig

    if isinstance(node, DictConfig):
        for k in node:
            yield from _leaves(node[k], f"{prefix}{k}.")
    elif isinstance(node, ListConfig):
        for item in node:
            yield from _leaves(item, f"{prefix[:-1]}[].")
    else:
        yield prefix[:-1], node


@pytest.mark.parametrize(
    "overrides",
    [[], ["pipeline=dpo"], ["pipeline=rlaif", "labeler=ai"], ["+experiment=tiny", "pipeline=grpo"]],
    ids=["rlhf", "dpo", "rlaif", "tiny-grpo"],
)
def test_every_numeric_key_of_the_composed_config_has_a_rule(overrides):
    declared = {key: rule for key, _, _, rule in rules.every_key(Config)}
    assert declared and all(rule is not None for rule in declared.values()), [
        key for key, rule in declared.items() if rule is None
    ]
    numeric = [
        key
        for key, value in _leaves(_composed(*overrides))
        if isinstance(value, int | float)
        and not isinstance(value, bool)
        and not key.startswith("distributed.deepspeed")
    ]
    assert len(numeric) > 100
    missing = [key for key in numeric if declared.get(key) is None]
    assert not missing, f"numeric keys with neither a rule nor UNCONSTRAINED: {missing}"


def test_a_new_numeric_key_without_a_rule_is_caught():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class WithNewKey:
        covered: int = 1
        forgotten: float = 0.5

        RULES = {"covered": COUNT}  # noqa: RUF012 (as a config class declares it, ClassVar or not)

    assert [(k, r) for k, _, _, r in rules.every_key(WithNewKey)] == [("covered", COUNT), ("forgotten", None)]


def test_the_readme_table_is_generated_from_the_rules():
    text = (ROOT / "docs" / "config-keys.md").read_text()
    assert rules.markdown(Config) in text, "docs/config-keys.md is stale: run `make config-keys`"
    assert "NO RULE" not in text
    assert "docs/config-keys.md" in (ROOT / "README.md").read_text()


# ---------------------------------------------------------------- out-of-range overrides, through the command line

OUT_OF_RANGE = [
    "stage.ppo.gamma=1.5",
    "stage.ppo.lam=-0.5",
    "stage.ppo.clip=0",
    "stage.ppo.top_p=1.5",
    "stage.ppo.rollouts_per_update=0",
    "stage.ppo.temperature=0",
    "stage.ppo.beta=-0.1",
    "stage.ppo.value_clip=-1",
    "stage.ppo.minibatch_size=0",
    "stage.ppo.ema_decay=1.0",
    "stage.ppo.max_new_tokens=0",
    "stage.sft.learning_rate=-0.0001",
    "stage.sft.batch_size=0",
    "stage.sft.warmup_ratio=2",
    "stage.comparisons.k=1",
    "stage.comparisons.temperature=-1",
    "stage.reward_model.learning_rate=0",
    "stage.reward_model.epochs=0",
    "stage.dpo.beta=0",
    "stage.dpo.label_smoothing=0.5",
    "stage.evaluate.min_judge_accuracy=1.5",
    "stage.evaluate.win_labeler_noise=0.7",
    "peft.r=0",
    "peft.dropout=1.0",
    "peft.quant_bits=3",
    "threads=0",
    "data.heldout_fraction=1.0",
    "labeler.noise=-0.3",
    "pipeline.min_rm_accuracy=2",
    "registry.max_kl_per_token=0",
    "stage.ppo.minibatch_size=7",  # a cross-key rule: must divide rollouts_per_update
]


def _run(*args: str, art: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [ALIGNFLOW, "align", "+experiment=tiny", f"artifacts_dir={art}", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


def _refused_here(*args: str, art: Path, names: tuple[str, ...]) -> str:
    """`_refused` for a run refused in this process (conftest.refusal_in_process): the same line."""
    line = refusal_in_process("+experiment=tiny", f"artifacts_dir={art}", *args)
    for name in names:
        assert name in line, line
    assert not art.exists() or not [p for p in art.iterdir() if p.is_dir()], "a refused run created a stage folder"
    return line


def _refused(done: subprocess.CompletedProcess, art: Path, *names: str) -> str:
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out[-3000:]
    for name in names:
        assert name in errors[0], errors[0]
    stages = [p.name for p in art.iterdir() if p.is_dir() and p.name not in ("hydra",)] if art.exists() else []
    assert not stages, f"created {stages}"  # no stage folder, no MLflow run, no label cache
    return errors[0]


@pytest.mark.parametrize("override", OUT_OF_RANGE)
def test_an_out_of_range_override_exits_1_with_one_line_naming_the_key(override, tmp_path):
    key = override.split("=")[0]
    line = _refused(_run(override, art=tmp_path / "art"), tmp_path / "art", key)
    assert line.startswith(f"error: {key}") or "must be a multiple" in line


def test_debug_shows_the_stack_of_an_expected_failure(tmp_path):
    done = _run("stage.ppo.gamma=1.5", "--debug", art=tmp_path / "art")
    assert done.returncode == 1 and "Traceback" in done.stderr and "stage.ppo.gamma" in done.stderr


# ---------------------------------------------------------------- model folders


def _model_case(tmp_path: Path, case: str) -> Path:
    folder = tmp_path / case
    if case == "missing":
        return tmp_path / "no" / "such" / "model"
    if case == "bert":
        from conftest import SHARED
        from transformers import BertConfig, BertModel, GPT2TokenizerFast

        tok = GPT2TokenizerFast.from_pretrained(str(SHARED / "tokenizers" / "gpt2"))
        BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64)).save_pretrained(folder)  # fmt: skip
        tok.save_pretrained(folder)
        return folder
    build_tiny_model(folder, "llama", context=64)
    if case == "corrupt":
        weights = folder / "model.safetensors"
        weights.write_bytes(b"\xff" * 8 + weights.read_bytes()[8:])  # a header length of 2^64-1
    if case == "no-tokenizer":
        for f in folder.iterdir():
            if f.name not in ("config.json", "model.safetensors", "generation_config.json"):
                f.unlink()
    return folder


MODEL_CASES = {
    "corrupt": "corrupt safetensors file",
    "bert": "is not a causal LM",
    "no-tokenizer": "no tokenizer files",
    "missing": "no such folder",
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_an_unusable_model_folder_is_one_line_naming_it(case, tmp_path):
    folder = _model_case(tmp_path, case)
    art = tmp_path / "art"
    if case == "corrupt":  # the command line itself, once: exit code 1, one line, no traceback
        line = _refused(_run(f"model.name_or_path={folder}", art=art), art, "model.name_or_path", str(folder))
    else:
        line = _refused_here(f"model.name_or_path={folder}", art=art, names=("model.name_or_path", str(folder)))
    assert MODEL_CASES[case] in line


def test_the_reward_model_and_judge_folders_are_checked_too(tmp_path):
    good = _model_case(tmp_path, "good")
    bad = _model_case(tmp_path, "corrupt")
    art = tmp_path / "art"
    _refused(
        _run(f"model.name_or_path={good}", f"stage.reward_model.name_or_path={bad}", art=art),
        art, "stage.reward_model.name_or_path", "corrupt",
    )  # fmt: skip
    from omegaconf import OmegaConf

    from flows.config import to_config
    from flows.preflight import preflight
    from stages.models.modeling import ModelError

    cfg = to_config(OmegaConf.from_dotlist(["labeler.kind=ai", f"labeler.ai.model={bad}"]))
    with pytest.raises(ModelError, match="^labeler.ai.model: .*corrupt safetensors"):
        preflight(cfg)


# ---------------------------------------------------------------- a misbehaving judge server


class Judge(LocalHttpServer):
    """An OpenAI-compatible server on 127.0.0.1 that misbehaves one way: `no-logprobs` (a completion
    without them), `invalid` (answers "Maybe"), `hang` (answers after the client's timeout)."""

    def __init__(self, mode: str):
        self.requests = 0
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                judge.requests += 1
                if mode == "hang":
                    time.sleep(3)
                if mode == "later-invalid":  # a good probe answer, then answers the run cannot use
                    top = [{"token": "1", "logprob": -0.3}, {"token": "2", "logprob": -1.4}]
                    token = "1" if judge.requests == 1 else "Maybe"
                    body = {"choices": [{"logprobs": {"content": [{"token": token, "top_logprobs": top}]}}]}
                elif mode == "no-logprobs":
                    body = {"choices": [{"message": {"content": "1"}}]}
                else:
                    token = "Maybe" if mode == "invalid" else "1"
                    top = [{"token": token, "logprob": -0.1}, {"token": "Perhaps", "logprob": -2.4}]
                    body = {"choices": [{"logprobs": {"content": [{"token": token, "top_logprobs": top}]}}]}
                try:
                    send_json(self, 200, json.dumps(body).encode())
                except OSError:  # the client gave up (the timeout case)
                    pass

        super().__init__(Handler)


JUDGE_CASES = {
    "no-logprobs": "no choices[0].logprobs",
    "invalid": "was answered 'Maybe'",
    "hang": "timed out after 0.5 s",
}


@pytest.mark.parametrize("mode", list(JUDGE_CASES))
def test_a_misbehaving_judge_server_is_refused_by_the_probe_before_any_stage(mode, tmp_path):
    judge = Judge(mode)
    art = tmp_path / "art"
    overrides = (
        "pipeline=rlaif", "labeler=ai", "labeler.ai.backend=http", "labeler.ai.model=judge-7b",
        f"labeler.ai.base_url={judge.url}", "labeler.ai.api_key_env=null", "labeler.ai.timeout_s=0.5",
        "labeler.ai.max_retries=0",
    )  # fmt: skip
    try:
        t0 = time.perf_counter()
        if mode == "no-logprobs":  # the command line itself, once
            line = _refused(_run(*overrides, art=art), art, "labeler.ai", judge.url)
        else:
            line = _refused_here(*overrides, art=art, names=("labeler.ai", judge.url))
        seconds = time.perf_counter() - t0
    finally:
        judge.close()
    assert JUDGE_CASES[mode] in line
    assert judge.requests == 1  # one probe request, and nothing computed before it (no prepare, no sft)
    assert seconds < 60


@pytest.mark.slow
def test_a_judge_failing_inside_a_stage_is_one_line_and_mlflow_keeps_the_traceback(tmp_path):
    import mlflow

    judge = Judge("later-invalid")  # passes the probe, then answers "Maybe" inside comparisons
    art = tmp_path / "art"
    try:
        done = _run(
            "pipeline=rlaif", "labeler=ai", "labeler.ai.backend=http", "labeler.ai.model=judge-7b",
            f"labeler.ai.base_url={judge.url}", "labeler.ai.api_key_env=null",
            "labeler.ai.max_invalid_fraction=0.1",  # the default, which the tiny experiment relaxes
            art=art, timeout=600,
        )  # fmt: skip
    finally:
        judge.close()
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in out, out[-3000:]
    (line,) = [x for x in out.splitlines() if x.startswith("error: ")]
    assert "labeler.ai.max_invalid_fraction=0.1" in line
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{art}/mlflow.db")
    exp = client.get_experiment_by_name("alignflow")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.mlflow.runName = 'comparisons'")
    assert run.info.status == "FAILED" and "max_invalid_fraction" in run.data.tags["alignflow.error"]
    text = Path(client.download_artifacts(run.info.run_id, "error.txt", str(tmp_path))).read_text()
    assert text.startswith("Traceback") and "JudgeError" in text
