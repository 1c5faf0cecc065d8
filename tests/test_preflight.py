"""Config errors before any compute (`flows/preflight.py`): each names the folder, file and line, or key."""

import json
import subprocess
import sys

import pytest

from flows.config import to_config
from flows.preflight import preflight
from stages.data.tokens import LengthError
from stages.models.modeling import ModelError
from tests.conftest import ROOT, build_tiny_model
from tests.test_config import _compose


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("models") / "gpt2", "gpt2", context=128)


def _pairs(tmp_path, prompt_words: int):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "tell me a story", "chosen": "Once upon a time.", "rejected": "No."}] * 5
    rows.insert(2, {"prompt": " ".join(["word"] * prompt_words), "chosen": "Yes.", "rejected": "No."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(model, *extra):
    return to_config(_compose([f"model.name_or_path={model}", *extra]))


def test_a_prompt_over_max_prompt_length_without_truncation_names_file_line_and_key(gpt2_folder, tmp_path):
    pairs = _pairs(tmp_path, prompt_words=200)
    args = ["data=files", "data.demonstrations=null", f"data.comparisons.path={pairs}", "data.truncation=false"]
    with pytest.raises(LengthError, match=rf"{pairs}:3: longer than .*stage\.sft\.max_prompt_length"):
        preflight(_cfg(gpt2_folder, *args))
    preflight(_cfg(gpt2_folder, *args[:-1]))  # with truncation (the default) the row is cut, not refused
    preflight(_cfg(gpt2_folder, *args, "data.max_dropped_fraction=0.5"))  # or dropped, within the allowance


def test_max_length_above_the_context_window_is_refused(gpt2_folder):
    with pytest.raises(
        ValueError, match=r"stage\.reward_model\.max_length: 512 is above the model's context window \(128"
    ):
        preflight(_cfg(gpt2_folder, "stage.reward_model.max_length=512"))
    with pytest.raises(ValueError, match=r"stage\.ppo\.max_new_tokens"):
        preflight(_cfg(gpt2_folder, "stage.ppo.max_new_tokens=100", "stage.ppo.max_prompt_length=100"))


def test_a_model_folder_without_safetensors_is_refused_with_the_reason(tmp_path):
    folder = build_tiny_model(tmp_path / "pickled", "llama", safetensors=False)
    with pytest.raises(ModelError, match=rf"{folder}: no \*\.safetensors weights \(found only pytorch_model\.bin\)"):
        preflight(_cfg(folder))
    with pytest.raises(ModelError, match="Pickled weights can execute code"):
        preflight(_cfg(folder))


def test_a_tokenizer_without_eos_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    tok.bos_token_id = tok.eos_token_id = None
    folder = build_tiny_model(tmp_path / "no-eos", "llama", tokenizer=tok)
    with pytest.raises(ModelError, match=rf"{folder}: the tokenizer has no EOS token"):
        preflight(_cfg(folder))


def test_the_cli_stops_before_any_stage_runs(tmp_path):
    folder = build_tiny_model(tmp_path / "pickled", "gpt2", safetensors=False)
    art = tmp_path / "artifacts"
    proc = subprocess.run(
        [sys.executable, "-m", "flows.align", f"artifacts_dir={art}", f"model.name_or_path={folder}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and "error: " in proc.stderr and "no *.safetensors" in proc.stderr
    made = {p.name for p in art.iterdir()} if art.exists() else set()
    assert made <= {"hydra"}  # only Hydra's run folder: no tracking store, no stage folder
