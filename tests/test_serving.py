"""Talking to a policy: the batched decoder (checked against `generate`), `alignflow serve-model` queried
with the `openai` client as users do, `alignflow chat` through a pseudo-terminal, and the served
endpoint used as the AI labeler's judge."""

import os
import re
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import Child, build_tiny_model, free_port

ALIGNFLOW = str(Path(sys.executable).with_name("alignflow"))
KEY = "test-key-not-a-secret"


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A small Llama with GPT-2's real tokenizer, given the chat template as the pipeline's prepare does."""
    from transformers import AutoTokenizer

    from stages.data.tokens import ensure_chat_template
    from stages.models.modeling import load_causal_lm

    folder = build_tiny_model(tmp_path_factory.mktemp("served") / "policy", "llama")
    tok = AutoTokenizer.from_pretrained(folder)
    if ensure_chat_template(tok):
        model = load_causal_lm(folder)
        model.resize_token_embeddings(len(tok))
        model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _events(engine, request_kwargs: dict):
    import queue

    from flows.serving.decoder import Done, Request

    got: queue.Queue = queue.Queue()
    engine.submit(Request(emit=got.put, **request_kwargs))
    events = []
    while not events or not isinstance(events[-1], Done):
        events.append(got.get(timeout=60))
        assert not isinstance(events[-1], Exception), events[-1]
    return events


def test_the_batched_decoder_matches_generate_row_by_row_and_reports_true_logprobs(policy):
    from flows.serving.decoder import Decoder
    from stages.models.modeling import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(policy), load_causal_lm(policy).eval()
    prompts = ["Hello there, how are", "A", "The garden in spring is full of"]  # three lengths: left padding
    ids = [tok(p)["input_ids"] for p in prompts]
    # a batch starts when it is full or its window closes: with room for exactly three and a window no
    # loaded machine reaches, the three decode as one batch because all three arrived, not by timing
    engine = Decoder(model, tok, max_batch=3, window_s=120.0)
    results = [None] * 3

    def ask(i):
        results[i] = _events(engine, {"ids": ids[i], "max_tokens": 6, "temperature": 0.0, "top_logprobs": 3})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.close()
    assert engine.largest_batch == 3 and engine.batches == 1
    with torch.no_grad():
        for i, events in enumerate(results):
            done = events[-1]
            alone = model.generate(
                torch.tensor([ids[i]]), max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id
            )
            new = alone[0, len(ids[i]) :].tolist()
            assert [t.id for e in events[:-1] for t in e.tokens] == new
            assert done.text == "".join(e.text for e in events[:-1]) == tok.decode(new)
            assert (done.finish_reason, done.completion_tokens, done.prompt_tokens) == ("length", 6, len(ids[i]))
            # the logprob of each chosen token, recomputed by one full forward pass of the whole sequence
            full = torch.log_softmax(model(alone).logits[0].float(), -1)
            want = [full[len(ids[i]) - 1 + k, t].item() for k, t in enumerate(new)]
            got = [t.logprob for e in events[:-1] for t in e.tokens]
            assert got == pytest.approx(want, abs=1e-4)
            assert [t.top[0][1] for e in events[:-1] for t in e.tokens] == pytest.approx(want, abs=1e-4)  # greedy


def test_a_stop_string_ends_the_answer_before_it_and_is_never_streamed(policy):
    from flows.serving.decoder import Decoder
    from stages.models.modeling import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(policy), load_causal_lm(policy)
    engine = Decoder(model, tok)
    ids = tok("Hello there")["input_ids"]
    free = _events(engine, {"ids": ids, "max_tokens": 8, "temperature": 0.0})[-1].text
    stop = free[len(free) // 2 : len(free) // 2 + 3]  # three characters from the middle of the free answer
    events = _events(engine, {"ids": ids, "max_tokens": 8, "temperature": 0.0, "stop": [stop]})
    engine.close()
    cut = free[: free.find(stop)]
    assert events[-1].finish_reason == "stop" and events[-1].text == cut
    assert "".join(e.text for e in events[:-1]) == cut


@pytest.fixture(scope="module")
def server(policy):
    port = free_port()
    env = {**os.environ, "ALIGNFLOW_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
    command = [ALIGNFLOW, "serve-model", "--source", str(policy), "--port", str(port), "--threads", "1"]
    command += ["--served-name", "tiny-policy"]
    with Child(command, env=env) as child:
        child.wait_for_url(f"http://127.0.0.1:{port}/health", timeout=180)
        yield f"http://127.0.0.1:{port}/v1", child


def test_the_served_policy_answers_the_openai_client_plain_and_streaming(server, policy):
    import openai

    url, child = server
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny-policy"]
    messages = [{"role": "user", "content": "Say something about the garden."}]
    plain = client.chat.completions.create(model="tiny-policy", messages=messages, max_tokens=7, temperature=0)
    choice = plain.choices[0]
    assert choice.finish_reason == "length" and plain.usage.completion_tokens == 7 and choice.message.content
    chunks = list(client.chat.completions.create(
        model="tiny-policy", messages=messages, max_tokens=7, temperature=0, stream=True))  # fmt: skip
    pieces = [c.choices[0].delta.content or "" for c in chunks]
    assert len([p for p in pieces if p]) >= 2 and "".join(pieces) == choice.message.content  # greedy: the same
    assert chunks[-1].choices[0].finish_reason == "length"
    # the chat template was applied: the same answer as `/completions` on the rendered prompt
    from transformers import AutoTokenizer

    rendered = AutoTokenizer.from_pretrained(policy).apply_chat_template(messages, tokenize=False,
                                                                        add_generation_prompt=True)  # fmt: skip
    raw = client.completions.create(model="tiny-policy", prompt=rendered, max_tokens=7, temperature=0)
    assert raw.choices[0].text == choice.message.content
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-policy", prompt=rendered, max_tokens=7, temperature=0, stream=True))  # fmt: skip
    assert streamed == raw.choices[0].text
    seeded = [client.chat.completions.create(model="tiny-policy", messages=messages, max_tokens=5, temperature=1.0,
                                             seed=3).choices[0].message.content for _ in range(2)]  # fmt: skip
    assert seeded[0] == seeded[1]


def test_the_served_policy_batches_concurrent_requests(server):
    import json
    import urllib.request

    import openai

    url, _ = server
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
    answers = []

    def ask(i):
        answers.append(client.completions.create(model="tiny-policy", prompt=f"Prompt {i}", max_tokens=24).choices[0])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 6
    health = json.load(urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=10))
    assert health["largest_batch"] >= 2  # requests that arrive together decode together


def test_bad_requests_are_answered_4xx_with_a_reason_and_a_wrong_key_is_refused(server):
    import openai

    url, _ = server
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as empty:
        client.chat.completions.create(model="tiny-policy", messages=[], max_tokens=3)
    assert "messages" in str(empty.value)
    with pytest.raises(openai.BadRequestError) as hot:
        client.chat.completions.create(model="tiny-policy", messages=[{"role": "user", "content": "hi"}],
                                       temperature=5)  # fmt: skip
    assert "temperature" in str(hot.value)
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model="tiny-policy", prompt="hi", max_tokens=100_000)
    assert "context" in str(long.value)
    with pytest.raises(openai.NotFoundError) as other:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert "tiny-policy" in str(other.value)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as bare:  # no key at all
        urllib.request.urlopen(url + "/models", timeout=10)
    assert bare.value.code == 401


def test_serving_with_vllm_on_a_machine_without_it_is_refused_in_one_line(policy):
    import subprocess

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal is for machines without it")
    done = subprocess.run([ALIGNFLOW, "serve-model", "--source", str(policy), "--engine", "vllm"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1 and "--engine vllm: needs a CUDA GPU" in done.stderr
    assert "Traceback" not in done.stderr


def test_chat_streams_answers_keeps_the_conversation_and_resets_in_a_terminal(policy):
    import re

    import pexpect

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = ["chat", "--source", str(policy), "--stats", "--temperature", "0", "--max-tokens", "4", "--threads", "1"]
    term = pexpect.spawn(ALIGNFLOW, command, env=env, encoding="utf-8", timeout=180, dimensions=(40, 200))
    stats = re.compile(r"\((\d+) prompt tokens, (\d+) generated")
    term.expect("/reset starts a new conversation")

    def turn(text: str) -> tuple[int, str]:
        term.expect_exact("you> ")
        term.sendline(text)
        term.expect_exact("assistant> ")
        term.expect(stats)
        return int(term.match.group(1)), term.before

    first, answer = turn("Tell me about the garden.")
    second, _ = turn("And the river?")
    assert second > first + 4  # the second prompt holds the first turn, its answer and the new question
    term.expect_exact("you> ")
    term.sendline("/reset")
    term.expect_exact("(new conversation)")
    again, answer_again = turn("Tell me about the garden.")
    assert again == first and answer_again.strip() == answer.strip()  # greedy: the same first answer
    term.expect_exact("you> ")
    term.sendline("/exit")
    term.expect(pexpect.EOF)
    term.close()
    assert term.exitstatus == 0


def test_the_served_embedded_judge_labels_as_the_local_backend_does(tmp_path):
    """Close the loop: `serve-model` serving the embedded judge is an OpenAI-compatible judge; the AI
    labeler's http backend (the `completions` endpoint: the text as is) reads the same preferences."""
    from stages import judge
    from stages.labeling.ai_labeler import AiLabeler, HttpJudge, load_judge
    from stages.settings.labeling import AiLabelerConfig, LabelerConfig

    local = AiLabelerConfig(preamble="A good response stays on the topic and has a positive tone.")
    cfg = judge.JudgeConfig(n_pairs=600, n_scores=200, n_eval_pairs=50, epochs=1)  # a valid judge, not a good one
    judge.run(cfg, LabelerConfig(kind="ai", ai=local), target_len=6, out_dir=tmp_path / "judge")
    items = [("describe the garden", ["lovely rose tree", "awful bus sad"]),
             ("tell me about the river", ["sad cold water", "happy fish river", "the the the"])]  # fmt: skip
    expected = AiLabeler(local, load_judge(local, tmp_path / "judge")).label_all(items)
    port = free_port()
    command = [ALIGNFLOW, "serve-model", "--source", str(tmp_path / "judge" / "model"), "--port", str(port),
               "--threads", "1", "--served-name", "embedded-judge"]  # fmt: skip
    with Child(command, env={**os.environ, "OMP_NUM_THREADS": "1"}) as child:
        child.wait_for_url(f"http://127.0.0.1:{port}/health", timeout=180)
        http = AiLabelerConfig(backend="http", endpoint="completions", model="embedded-judge", api_key_env=None,
                               base_url=f"http://127.0.0.1:{port}/v1", preamble=local.preamble)  # fmt: skip
        served = HttpJudge(http)
        served.probe()  # the preflight probe the flow sends before any stage
        got = AiLabeler(http, served).label_all(items)
    assert [g["ranks"] for g in got] == [e["ranks"] for e in expected]
    for g, e in zip(got, expected, strict=True):
        assert (g["pairs"], g["consistent"]) == (e["pairs"], e["consistent"])
        for row_got, row_expected in zip(g["prefs"], e["prefs"], strict=True):
            assert row_got == pytest.approx(row_expected, abs=1e-3)  # P(i > j): the same within float error


def test_the_decoder_samples_on_the_device_and_copies_a_few_numbers_to_the_host_per_step(policy, monkeypatch):
    """Each decoding step brings back one small copy (each row's token, its log-prob, its top
    alternatives), never the vocabulary's logits; seeded sampling stays reproducible."""
    import sys

    from torch.overrides import TorchFunctionMode

    from flows.serving.decoder import Decoder
    from stages.models.modeling import load_causal_lm, load_tokenizer

    class Copies(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = getattr(func, "__name__", "")
            if name in {"item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__"}:
                if sys._getframe(1).f_code.co_filename.endswith("flows/serving/decoder.py"):
                    numel = out.numel() if isinstance(out, torch.Tensor) else len(args[0].reshape(-1))
                    self.calls.append((name, numel))
            return out

    copies = Copies()
    original = Decoder.decode
    monkeypatch.setattr(Decoder, "decode", lambda self, batch: _under(copies, original, self, batch))
    tok, model = load_tokenizer(policy), load_causal_lm(policy).eval()
    engine = Decoder(model, tok, max_batch=1, window_s=0.0)
    runs = []
    for _ in range(2):
        runs.append(_events(engine, {"ids": tok("Hello there")["input_ids"], "max_tokens": 5, "seed": 7,
                                     "temperature": 0.9, "top_p": 0.8, "top_logprobs": 2}))  # fmt: skip
    engine.close()
    assert [t.id for e in runs[0][:-1] for t in e.tokens] == [t.id for e in runs[1][:-1] for t in e.tokens]
    steps = sum(runs[0][-1].completion_tokens for _ in runs)
    assert 0 < len(copies.calls) <= steps + 2, copies.calls  # one per step (a step that ends a row may be the last)
    assert all(name == "tolist" and numel <= 2 + 2 * 2 for name, numel in copies.calls), copies.calls


def _under(mode, fn, *args):
    with mode:
        return fn(*args)


@pytest.fixture(scope="module")
def app_client(policy):
    """The server's app in process (Starlette's TestClient), with small limits, on its own engine."""
    from fastapi.testclient import TestClient

    from flows.serving.decoder import Decoder
    from flows.serving.openai_server import Limits, build_app
    from stages.models.modeling import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(policy), load_causal_lm(policy).eval()
    engine = Decoder(model, tok, max_batch=4, window_s=0.05)
    limits = Limits(body_bytes=4096, choices=6, waiting=8)
    with TestClient(build_app(engine, tok, "tiny", 512, None, 8, limits), raise_server_exceptions=False) as client:
        yield client, engine
    engine.close()


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_every_non_2xx_answer_is_in_the_openai_error_shape(app_client):
    client, _ = app_client
    bad_json = client.post("/v1/completions", content=b'{"prompt": "hi", "max_tokens": ', headers=JSON)
    assert _error(bad_json, 400)["param"] is None  # not a byte offset
    deep = client.post("/v1/completions", content=b"[" * 2000 + b"]" * 2000, headers=JSON)  # under the body limit
    _error(deep, 400)
    utf8 = client.post("/v1/completions", content=b'{"prompt": "\xff\xfe"}', headers=JSON)
    _error(utf8, 400)
    assert _error(client.get("/v1/nowhere"), 404)["code"] == "not_found"
    assert _error(client.get("/v1/completions"), 405)["code"] == "method_not_allowed"
    big = client.post("/v1/completions", content=b'{"prompt": "' + b"a" * 10_000 + b'"}', headers=JSON)
    assert _error(big, 413)["code"] == "body_too_large"
    many = client.post("/v1/completions", json={"prompt": ["a", "b", "c"], "n": 3, "max_tokens": 2})
    assert _error(many, 400)["param"] == "n"
    long = client.post("/v1/completions", json={"prompt": "hi " * 600, "max_tokens": 2})
    assert _error(long, 400)["param"] == "prompt"  # the completions context error names its own field


def test_a_full_queue_answers_429_with_retry_after_and_the_queue_drains(app_client):
    client, _ = app_client
    import concurrent.futures

    body = {"prompt": "tell me", "max_tokens": 40, "n": 6, "temperature": 0.7}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: client.post("/v1/completions", json=body), range(4)))
    codes = sorted(a.status_code for a in answers)
    assert 200 in codes and 429 in codes, codes  # 6 sequences each against a queue of 8
    busy = next(a for a in answers if a.status_code == 429)
    assert busy.headers["retry-after"] == "1" and _error(busy, 429)["code"] == "server_busy"
    assert client.post("/v1/completions", json={**body, "n": 1}).status_code == 200  # the queue drained


def test_sampling_values_at_the_edges_of_their_range_decode(app_client):
    client, _ = app_client
    for extra in ({"temperature": 1e-30}, {"seed": 2**80}, {"seed": -(2**70)}, {"top_p": 1e-300}):
        answer = client.post("/v1/completions", json={"prompt": "the garden", "max_tokens": 3, **extra})
        assert answer.status_code == 200, (extra, answer.text)


def test_a_poisoned_request_fails_alone_and_the_batch_beside_it_is_answered(policy, monkeypatch):
    """One request that breaks the batched decoder (here: a forward pass that fails whenever its batch
    holds a marked prompt) gets its error; the requests batched with it are decoded again and answered."""
    import queue

    from flows.serving.decoder import Decoder, Done, Request
    from stages.models.modeling import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(policy), load_causal_lm(policy).eval()
    poison = tok("poison")["input_ids"][0]
    forward = model.forward

    def fragile(*args, input_ids=None, **kwargs):
        if input_ids is not None and (input_ids == poison).any():
            raise RuntimeError("this batch holds the poisoned prompt")
        return forward(*args, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(model, "forward", fragile)
    engine = Decoder(model, tok, max_batch=3, window_s=120.0)  # the three decode as one batch
    boxes = [queue.Queue() for _ in range(3)]
    prompts = ["the garden", "poison here", "tell me"]
    for text, box in zip(prompts, boxes, strict=True):
        engine.submit(Request(tok(text)["input_ids"], 4, box.put, temperature=0.0))
    last = []
    for box in boxes:
        while not isinstance(event := box.get(timeout=60), (Done, Exception)):
            pass
        last.append(event)
    engine.close()
    assert isinstance(last[1], RuntimeError) and "poisoned" in str(last[1])
    assert isinstance(last[0], Done) and isinstance(last[2], Done)
    assert engine.largest_batch == 3 and engine.batches >= 3  # the batch, then each alone


def test_a_large_body_being_tokenised_does_not_block_health(policy):
    """Tokenising runs off the event loop: /health answers while a long prompt is being tokenised."""
    import asyncio
    import time

    import httpx

    from flows.serving.decoder import Decoder
    from flows.serving.openai_server import Limits, build_app
    from stages.models.modeling import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(policy), load_causal_lm(policy).eval()
    slow = _SlowTokenizer(tok, seconds=1.5)
    engine = Decoder(model, tok, max_batch=2, window_s=0.0)
    app = build_app(engine, slow, "tiny", 512, None, 2, Limits())

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            work = asyncio.create_task(client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}))
            await asyncio.sleep(0.2)
            t0 = time.perf_counter()
            health = await client.get("/health")
            waited = time.perf_counter() - t0
            await work
            return health.status_code, waited

    status, waited = asyncio.run(scenario())
    engine.close()
    assert status == 200 and waited < 1.0, waited  # it did not wait for the 1.5 s tokenisation


class _SlowTokenizer:
    """A tokenizer that takes `seconds` per call (as a megabyte prompt would), otherwise the real one."""

    def __init__(self, tok, seconds: float) -> None:
        self.tok, self.seconds = tok, seconds

    def __call__(self, *args, **kwargs):
        import time

        time.sleep(self.seconds)
        return self.tok(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


JSON = {"content-type": "application/json"}


def _broken_folder(policy: Path, where: Path, breakage: str) -> Path:
    """A copy of the policy folder broken one way."""
    import shutil

    folder = where / breakage
    shutil.copytree(policy, folder)
    weights = folder / "model.safetensors"
    if breakage == "corrupt-weights":
        weights.write_bytes(os.urandom(4096))
    elif breakage == "truncated-weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif breakage == "no-weights":
        weights.unlink()
    elif breakage == "no-tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
            (folder / name).unlink(missing_ok=True)
    return folder


def _one_error_line(done, *names: str) -> str:
    assert done.returncode == 1, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert all(name in errors[0] for name in names), errors[0]
    return errors[0]


@pytest.mark.parametrize("breakage", ["corrupt-weights", "truncated-weights", "no-weights", "no-tokenizer"])
@pytest.mark.parametrize("command", ["serve-model", "chat", "export"])
def test_an_unusable_model_folder_is_one_error_line_naming_it(policy, tmp_path, command, breakage):
    import subprocess

    folder = _broken_folder(policy, tmp_path, breakage)
    extra = {"serve-model": ["--port", str(free_port())], "chat": [], "export": ["--out", str(tmp_path / "out")]}
    done = subprocess.run([ALIGNFLOW, command, "--source", str(folder), *extra[command]], capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL, env=_one_thread())  # fmt: skip
    _one_error_line(done, str(folder.name))
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_an_out_folder_that_cannot_be_one_is_refused_in_one_line_before_the_model_loads(policy, tmp_path):
    import subprocess

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = {
        "is a file": a_file,
        "lies under": a_file / "inside",
        "cannot write": Path("/proc/alignflow-export"),  # not writable whoever runs it, root included
    }
    for words, out in cases.items():
        done = subprocess.run([ALIGNFLOW, "export", "--source", str(policy), "--out", str(out)],
                              capture_output=True, text=True, timeout=300, env=_one_thread())  # fmt: skip
        line = _one_error_line(done, "--out", words)
        assert str(out) in line
    assert a_file.read_text() == "x"


def test_serve_model_on_a_busy_port_says_so_in_one_line(policy):
    import socket
    import subprocess

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = subprocess.run([ALIGNFLOW, "serve-model", "--source", str(policy), "--port", str(port)],
                              capture_output=True, text=True, timeout=300, env=_one_thread())  # fmt: skip
    _one_error_line(done, f"--port {port}")


def test_chat_refuses_one_turn_longer_than_the_context_and_keeps_the_session(policy):
    import subprocess

    long_turn = "garden " * 400  # ~400 tokens against a context of 256
    script = f"Tell me about the river.\n{long_turn}\nAnd the garden?\n/exit\n"
    done = subprocess.run([ALIGNFLOW, "chat", "--source", str(policy), "--stats", "--temperature", "0",
                           "--max-tokens", "3", "--threads", "1"], input=script, capture_output=True, text=True,
                          timeout=300, env=_one_thread())  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "context is 256" in errors[0] and "Traceback" not in done.stderr, done.stderr
    assert done.stdout.count("assistant> ") == 2  # the turns before and after it were answered
    prompts = [int(n) for n in re.findall(r"\((\d+) prompt tokens", done.stdout)]
    assert prompts[1] > prompts[0]  # the second answer still holds the first turn: the session was kept


def _one_thread() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}
