"""`make bench-serve`: `serve-model` under concurrent clients, against one `generate` per request in turn.

    python -m bench.serve_load [--clients 1,4,16,64] [--requests 2] [--max-tokens 32] [--models tiny,110m]

For each model (a tiny Llama, and the ~110M Llama of `make bench-peft`, both with GPT-2's tokenizer) it
starts `alignflow serve-model` (2 torch threads, batches of up to 16) and, for each number of
concurrent clients, lets every client send `--requests` streaming completions one after another
(greedy, `--max-tokens` each, OpenAI's `stream_options.include_usage` for the token count). Per level:
requests/s, generated tokens/s, p50/p99 latency and time to first token, and every status code seen.
The baseline runs the same prompts as one `model.generate` call per request in turn, in its own process
with the same 2 threads. Writes `artifacts/bench/serve_load.json`; the target is at 16 clients at least
3x the baseline's tokens/s, with no 5xx at any level.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALIGNFLOW = str(Path(sys.executable).with_name("alignflow"))
WORDS = "the garden river light stone morning story answer quiet bright friend ocean".split()
THREADS = 2


def build(kind: str, folder: Path) -> Path:
    from bench.peft_methods import build_model

    return build_model(folder, 64, 2) if kind == "tiny" else build_model(folder, 768, 10)


def prompts(n: int) -> list[str]:
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(8 + i % 5)) for i in range(n)]


def baseline(folder: Path, texts: list[str], max_tokens: int) -> dict:
    """One `generate` call per request, in turn (a child process with the server's threads)."""
    code = f"""
import json, sys, time, torch
torch.set_num_threads({THREADS})
from stages.models.modeling import load_causal_lm, load_tokenizer
tok, model = load_tokenizer({str(folder)!r}), load_causal_lm({str(folder)!r}).eval()
texts = json.loads(sys.stdin.read())
latencies, tokens = [], 0
t0 = time.perf_counter()
with torch.no_grad():
    for text in texts:
        ids = torch.tensor([tok(text)["input_ids"]])
        s = time.perf_counter()
        out = model.generate(ids, max_new_tokens={max_tokens}, do_sample=False, pad_token_id=tok.eos_token_id)
        latencies.append(time.perf_counter() - s)
        tokens += out.shape[1] - ids.shape[1]
print("RESULT " + json.dumps({{"seconds": time.perf_counter() - t0, "tokens": tokens, "latencies": latencies}}))
"""
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(texts), capture_output=True, text=True,
                          cwd=ROOT, env=env, check=False)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"baseline failed:\n{done.stderr[-3000:]}")
    raw = json.loads(done.stdout.split("RESULT ", 1)[1])
    return summary(raw["seconds"], raw["tokens"], raw["latencies"], [], {"200": len(texts)})


def summary(seconds: float, tokens: int, latencies: list[float], ttfts: list[float], codes: dict) -> dict:
    def pct(xs: list[float], q: float) -> float | None:
        return round(statistics.quantiles(xs, n=100)[q - 1], 3) if len(xs) >= 2 else (round(xs[0], 3) if xs else None)

    return {
        "requests": len(latencies),
        "seconds": round(seconds, 2),
        "requests_per_s": round(len(latencies) / seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "p50_latency_s": pct(latencies, 50),
        "p99_latency_s": pct(latencies, 99),
        "p50_ttft_s": pct(ttfts, 50),
        "p99_ttft_s": pct(ttfts, 99),
        "status_codes": codes,
    }


async def load(url: str, texts: list[str], clients: int, max_tokens: int) -> dict:
    """`clients` concurrent clients, each sending its share of `texts` one after another, streaming."""
    import httpx

    latencies, ttfts, codes, tokens = [], [], {}, [0]
    queue: asyncio.Queue = asyncio.Queue()
    for text in texts:
        queue.put_nowait(text)

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            text = queue.get_nowait()
            body = {"prompt": text, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip
            start, first = time.perf_counter(), None
            async with http.stream("POST", f"{url}/v1/completions", json=body) as answer:
                codes[str(answer.status_code)] = codes.get(str(answer.status_code), 0) + 1
                async for line in answer.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                        first = time.perf_counter()
                    if chunk.get("usage"):
                        tokens[0] += chunk["usage"]["completion_tokens"]
            latencies.append(time.perf_counter() - start)
            if first is not None:
                ttfts.append(first - start)

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return summary(time.perf_counter() - t0, tokens[0], latencies, ttfts, codes)


def serve(folder: Path, port: int) -> subprocess.Popen:
    command = [ALIGNFLOW, "serve-model", "--source", str(folder), "--port", str(port), "--threads", str(THREADS),
               "--max-batch", "16", "--max-waiting", "1024"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    import urllib.request

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve-model exited: {proc.stdout.read()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("serve-model did not answer /health in 300 s")


def one_model(kind: str, work: Path, clients: list[int], per_client: int, max_tokens: int) -> dict:
    from flows.launch.launch import free_port

    folder = build(kind, work / kind)
    most = max(clients) * per_client
    texts = prompts(most)
    base = baseline(folder, texts[: max(8, 4 * per_client)], max_tokens)
    print(f"{kind}: baseline {base['tokens_per_s']} tokens/s", flush=True)
    port = free_port()
    proc = serve(folder, port)
    levels = {}
    try:
        asyncio.run(load(f"http://127.0.0.1:{port}", texts[:4], 2, max_tokens))  # warm-up
        for c in clients:
            levels[str(c)] = asyncio.run(load(f"http://127.0.0.1:{port}", texts[: c * per_client], c, max_tokens))
            print(f"{kind}: {c} clients {levels[str(c)]['tokens_per_s']} tokens/s", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    at16 = levels.get("16", {}).get("tokens_per_s")
    return {
        "baseline_one_generate_per_request": base,
        "served": levels,
        "speedup_at_16_clients": round(at16 / base["tokens_per_s"], 2) if at16 else None,
        "server_errors_5xx": sum(
            n for lv in levels.values() for code, n in lv["status_codes"].items() if code >= "500"
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--requests", type=int, default=2, help="requests each client sends in turn")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--models", default="tiny,110m")
    ap.add_argument("--out", default=str(ROOT / "artifacts" / "bench" / "serve_load.json"))
    args = ap.parse_args()
    import tempfile

    from bench.common import write_results

    clients = [int(c) for c in args.clients.split(",")]
    work = Path(tempfile.mkdtemp(prefix="alignflow-serve-load-"))
    results = {
        "machine": f"{os.cpu_count()} cores, {THREADS} torch threads for the server and for the baseline",
        "max_tokens": args.max_tokens,
        "target": "at 16 clients >= 3x the baseline's tokens/s; no 5xx",
        "models": {
            kind: one_model(kind, work, clients, args.requests, args.max_tokens) for kind in args.models.split(",")
        },
    }
    write_results(Path(args.out), results, echo=True)


if __name__ == "__main__":
    main()
