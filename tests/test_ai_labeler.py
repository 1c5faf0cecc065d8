"""The AI labeler: its maths on hand-computed values, the labeler over a scripted judge, the local
backend on real tokenizers, and the HTTP backend against a real server on 127.0.0.1."""

import json
import math
import time
from http.server import BaseHTTPRequestHandler

import pytest
import torch

from stages.labeling.ai_labeler import (
    AiLabeler,
    HttpJudge,
    JudgeError,
    LocalJudge,
    debias,
    expected_score,
    normalized_score,
    pair_prompt,
    position_consistent,
    ranks_from_preferences,
    two_way_preference,
)
from stages.labeling.labelers import CachedLabeler
from stages.settings.labeling import AiLabelerConfig
from tests.conftest import SHARED, LocalHttpServer, need_shared, send_json

# ---------------------------------------------------------------- maths, by hand


def test_two_way_preference_renormalises_over_1_and_2():
    p = two_way_preference(torch.tensor([math.log(0.6)]), torch.tensor([math.log(0.2)]))
    assert p.item() == pytest.approx(0.75)  # 0.6 / (0.6 + 0.2)
    both_missing = two_way_preference(torch.tensor([-math.inf]), torch.tensor([-math.inf]))
    assert both_missing.item() == 0.5


def test_position_debiasing_averages_both_orders():
    p_ab, p_ba = torch.tensor([0.8, 0.8, 0.3]), torch.tensor([0.4, 0.7, 0.9])
    # a first: 0.8 for a; b first: P(b) = 0.4 -> P(a) = 0.6; mean 0.7
    assert debias(p_ab, p_ba).tolist() == pytest.approx([0.7, 0.55, 0.2])
    # consistent: both orders pick the same response (a, then a; a, then b first wins -> no; b, b)
    assert position_consistent(p_ab, p_ba).tolist() == [True, False, True]


def test_k_responses_rank_by_soft_borda_count():
    prefs = [[0.5, 0.2, 0.9], [0.8, 0.5, 0.6], [0.1, 0.4, 0.5]]
    # sums off the diagonal: 1.1, 1.4, 0.5 -> ranks 1, 0, 2
    assert ranks_from_preferences(prefs) == [1, 0, 2]
    assert ranks_from_preferences([[0.5, 0.5], [0.5, 0.5]]) == [0, 0]  # a tie shares a rank


def test_expected_1_to_10_score():
    certain_7 = torch.full((1, 10), -math.inf)
    certain_7[0, 6] = 0.0
    assert expected_score(certain_7).item() == pytest.approx(7.0)
    assert expected_score(torch.zeros(1, 10)).item() == pytest.approx(5.5)  # uniform
    two = torch.full((1, 10), -math.inf)
    two[0, 1], two[0, 9] = math.log(0.25), math.log(0.75)  # 0.25 * 2 + 0.75 * 10
    assert expected_score(two).item() == pytest.approx(8.0)
    assert normalized_score(torch.tensor([1.0, 5.5, 10.0])).tolist() == pytest.approx([-1.0, 0.0, 1.0])


# ---------------------------------------------------------------- the labeler over a scripted judge


class ScriptedJudge:
    """Prefers the response with more "good"; always leans 0.1 towards whichever comes first."""

    identity = "scripted"

    def __init__(self, answers_other=0.0):
        self.texts: list[str] = []
        self.answers_other = answers_other

    def next_token_logprobs(self, texts, candidates):
        self.texts += texts
        rows, valid = [], []
        for n, t in enumerate(texts):
            if candidates == ("1", "2"):
                first = t.split("Response 1: ")[1].split("\n")[0]
                second = t.split("Response 2: ")[1].split("\n")[0]
                p = min(0.95, max(0.05, 0.6 + 0.3 * (first.count("good") - second.count("good"))))
                rows.append([math.log(p), math.log(1 - p)])
            else:
                score = min(10, 1 + 3 * t.split("Response: ")[1].count("good"))
                rows.append([0.0 if s == score else -math.inf for s in range(1, 11)])
            valid.append(n >= self.answers_other * len(texts))
        return torch.tensor(rows), torch.tensor(valid)

    def generate(self, texts, max_new_tokens):
        return ["the first one says good more often"] * len(texts)


def test_labeler_asks_both_orders_and_ranks_k_responses():
    judge = ScriptedJudge()
    labeler = AiLabeler(AiLabelerConfig(preamble="Be good."), judge)
    [label] = labeler.label_all([("say something", ["good good", "bad", "good"])])
    assert len(judge.texts) == 2 * 3  # C(3,2) pairs, both orders
    assert all(t.startswith("Be good.") and t.endswith("Preferred response=") for t in judge.texts)
    # pair (0, 1): a first 0.95 (clipped from 1.2), b first 0.05 -> P(a) 0.95; position bias cancels
    assert label["prefs"][0][1] == pytest.approx(0.95)
    assert label["prefs"][0][2] == pytest.approx(0.5 * (0.9 + 1 - 0.3))
    assert label["prefs"][1][0] == pytest.approx(1 - label["prefs"][0][1])
    assert label["ranks"] == [0, 2, 1]
    assert label["pairs"] == 3 and label["consistent"] == 3


def test_chain_of_thought_puts_the_rationale_before_the_answer():
    judge = ScriptedJudge()
    AiLabeler(AiLabelerConfig(chain_of_thought=True), judge).label_all([("p", ["good", "bad"])])
    assert all("Rationale: the first one says good more often\nPreferred response=" in t for t in judge.texts)


def test_direct_scores_are_expected_scores_in_minus_1_to_1():
    labeler = AiLabeler(AiLabelerConfig(), ScriptedJudge())
    assert labeler.score_all(["p", "p"], ["bad", "good good good"]) == pytest.approx([-1.0, (10 - 5.5) / 4.5])


def test_too_many_invalid_answers_stop_with_the_config_key():
    labeler = AiLabeler(AiLabelerConfig(max_invalid_fraction=0.2), ScriptedJudge(answers_other=0.5))
    with pytest.raises(JudgeError, match="max_invalid_fraction"):
        labeler.label_all([("p", ["good", "bad", "ok"])])


def test_labels_are_cached_by_content(tmp_path):
    judge = ScriptedJudge()
    items = [("p", ["good", "bad"]), ("q", ["a", "good"])]
    cached = CachedLabeler(AiLabeler(AiLabelerConfig(), judge), tmp_path / "cache.jsonl")
    first = cached.label_all(items)
    asked = len(judge.texts)
    again = CachedLabeler(AiLabeler(AiLabelerConfig(), judge), tmp_path / "cache.jsonl")
    assert again.label_all(items) == first and again.asked == 0 and len(judge.texts) == asked
    assert again.score_all(["p"], ["good"]) == again.score_all(["p"], ["good"]) and again.asked == 0
    # another preamble is another judge: nothing reused
    other = CachedLabeler(AiLabeler(AiLabelerConfig(preamble="Other."), judge), tmp_path / "cache.jsonl")
    other.label_all(items)
    assert other.asked == 2


# ---------------------------------------------------------------- the local backend on real tokenizers


def _tiny_lm(tokenizer, folder):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _real_tokenizer(name, tmp_path):
    folder = need_shared(SHARED / "tokenizers" / name)
    if name == "gpt2":
        from transformers import GPT2TokenizerFast

        tok = GPT2TokenizerFast.from_pretrained(str(folder))
    else:
        import shutil

        from transformers import LlamaTokenizer

        (tmp_path / "sp").mkdir()
        shutil.copy(folder / "tok512.model", tmp_path / "sp" / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(str(tmp_path / "sp"))
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


@pytest.mark.parametrize("name", ["gpt2", "tok512-sentencepiece"])
def test_local_judge_reads_the_answer_tokens_of_a_real_tokenizer(name, tmp_path):
    tok = _real_tokenizer(name, tmp_path)
    judge = LocalJudge(_tiny_lm(tok, tmp_path / "judge"))
    for answer in ("1", "2"):
        [piece] = judge._continuation(answer)  # one token after "Preferred response="
        assert tok.decode([piece]).strip() == answer
    text = pair_prompt(AiLabelerConfig(), "write a story", "Once upon a time", "The end")
    lp, valid = judge.next_token_logprobs([text, text + " "], ("1", "2"))
    assert lp.shape == (2, 2) and torch.all(lp < 0) and valid.dtype == torch.bool
    # left padding does not change the answer of the shorter prompt
    alone, _ = judge.next_token_logprobs([text], ("1", "2"))
    assert torch.allclose(alone[0], lp[0], atol=1e-4)


def test_an_untrained_local_judge_is_refused_for_invalid_answers(tmp_path):
    tok = _real_tokenizer("gpt2", tmp_path)
    labeler = AiLabeler(AiLabelerConfig(max_invalid_fraction=0.1), LocalJudge(_tiny_lm(tok, tmp_path / "judge")))
    with pytest.raises(JudgeError, match="other than 1 or 2"):
        labeler.label_all([("write a story", ["Once upon a time", "The end", "Hello"])])


# ---------------------------------------------------------------- the HTTP backend against a real server


def _completion(p_first: float) -> dict:
    top = [{"token": "1", "logprob": math.log(p_first)}, {"token": "2", "logprob": math.log(1 - p_first)}]
    top.sort(key=lambda e: -e["logprob"])
    return {"choices": [{"logprobs": {"content": [{"token": top[0]["token"], "logprob": 0.0, "top_logprobs": top}]}}]}


class Server(LocalHttpServer):
    """A scripted OpenAI-compatible responder on 127.0.0.1: each request takes the next scripted
    action, then answers by content (the response with more "good" wins, 0.8 to 0.2)."""

    def __init__(self, script=()):
        self.script = list(script)
        self.requests: list[dict] = []
        self.headers: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                server.headers.append(self.headers.get("Authorization", ""))
                action = server.script.pop(0) if server.script else "ok"
                if action == "sleep":
                    time.sleep(1.0)
                    action = "ok"
                if isinstance(action, int):
                    return self._send(action, b'{"error": "busy"}')
                if action == "malformed":
                    return self._send(200, b'{"choices": [{"message": {"content": "1"}}]}')
                if action == "not json":
                    return self._send(200, b"<html>gateway</html>")
                text = body["messages"][0]["content"]
                first = text.split("Response 1: ")[1].split("\n")[0].count("good")
                second = text.split("Response 2: ")[1].split("\n")[0].count("good")
                p = 0.5 if first == second else (0.8 if first > second else 0.2)
                self._send(200, json.dumps(_completion(p)).encode())

            def _send(self, code, payload):
                send_json(self, code, payload)

        super().__init__(Handler)


@pytest.fixture
def server():
    servers = []

    def start(script=()):
        servers.append(Server(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _http(url, **kw) -> AiLabelerConfig:
    defaults = dict(backend="http", model="judge-7b", base_url=url, api_key_env="ALIGNFLOW_TEST_KEY", backoff_s=0.01)
    return AiLabelerConfig(**(defaults | kw))


ITEMS = [("say something", ["good", "bad"])]


def test_http_judge_labels_with_the_key_from_the_environment(server, monkeypatch):
    monkeypatch.setenv("ALIGNFLOW_TEST_KEY", "sk-secret")
    s = server()
    [label] = AiLabeler(_http(s.url), HttpJudge(_http(s.url))).label_all(ITEMS)
    assert label["prefs"][0][1] == pytest.approx(0.8) and label["ranks"] == [0, 1]
    assert len(s.requests) == 2 and s.headers == ["Bearer sk-secret"] * 2
    assert s.requests[0]["model"] == "judge-7b" and s.requests[0]["logprobs"] is True


def test_http_judge_retries_a_429_then_succeeds(server, monkeypatch):
    monkeypatch.setenv("ALIGNFLOW_TEST_KEY", "k")
    s = server([429])
    judge = HttpJudge(_http(s.url, concurrency=1))
    lp, valid = judge.next_token_logprobs([pair_prompt(AiLabelerConfig(), "p", "good", "bad")], ("1", "2"))
    assert len(s.requests) == 2 and valid.tolist() == [True]
    assert torch.sigmoid(lp[0, 0] - lp[0, 1]).item() == pytest.approx(0.8)


def test_http_judge_retries_500s(server, monkeypatch):
    monkeypatch.setenv("ALIGNFLOW_TEST_KEY", "k")
    s = server([500, 503])
    lp, _ = HttpJudge(_http(s.url, concurrency=1)).next_token_logprobs(
        ["Response 1: good\nResponse 2: bad\n"], ("1", "2")
    )
    assert len(s.requests) == 3 and torch.isfinite(lp).all()
    s2 = server([500, 500, 500])
    with pytest.raises(JudgeError, match="HTTP 500 .3 attempts"):
        HttpJudge(_http(s2.url, concurrency=1, max_retries=2)).next_token_logprobs(["x"], ("1", "2"))


def test_http_judge_times_out_clearly(server, monkeypatch):
    monkeypatch.setenv("ALIGNFLOW_TEST_KEY", "k")
    s = server(["sleep", "sleep"])
    with pytest.raises(JudgeError, match="timed out after 0.2 s .2 attempts"):
        HttpJudge(_http(s.url, timeout_s=0.2, max_retries=1)).next_token_logprobs(["x"], ("1", "2"))


@pytest.mark.parametrize("action", ["malformed", "not json"])
def test_http_malformed_body_is_a_clear_error_and_nothing_is_cached(server, monkeypatch, tmp_path, action):
    monkeypatch.setenv("ALIGNFLOW_TEST_KEY", "sk-secret")
    s = server([action] * 4)
    cache = tmp_path / "cache.jsonl"
    labeler = CachedLabeler(AiLabeler(_http(s.url), HttpJudge(_http(s.url))), cache)
    with pytest.raises(JudgeError, match="malformed response") as err:
        labeler.label_all(ITEMS)
    assert "sk-secret" not in str(err.value)
    assert not cache.exists() and labeler.cache == {}


def test_unreachable_server_is_one_clear_line(monkeypatch):
    import socket

    monkeypatch.setenv("ALIGNFLOW_TEST_KEY", "k")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once closed
    with pytest.raises(JudgeError, match=f"cannot reach http://127.0.0.1:{port}") as err:
        HttpJudge(_http(f"http://127.0.0.1:{port}/v1")).next_token_logprobs(["x"], ("1", "2"))
    assert "\n" not in str(err.value)


def test_missing_api_key_is_named(monkeypatch):
    monkeypatch.delenv("ALIGNFLOW_TEST_KEY", raising=False)
    with pytest.raises(JudgeError, match="ALIGNFLOW_TEST_KEY is not set"):
        HttpJudge(_http("http://127.0.0.1:9/v1"))
