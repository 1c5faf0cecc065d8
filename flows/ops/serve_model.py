"""`make serve-model` / `alignflow serve-model`: the champion (or any policy) behind an OpenAI-compatible
API on 127.0.0.1.

    alignflow serve-model [--source champion|models:/NAME@ALIAS|PATH] [--port 8000] [--engine auto]

- `--engine vllm`: vLLM's own OpenAI server (needs a CUDA GPU and the `vllm` package); `auto` picks it
  where both are present, else `transformers`: the FastAPI + uvicorn server here, on the batched
  decoder of `flows/ops/engine.py`.
- Endpoints: `GET /v1/models`, `POST /v1/chat/completions` (the model's chat template), `POST
  /v1/completions` (raw text); `stream: true` answers as server-sent events ending in `data: [DONE]`.
  `max_tokens`, `temperature` (0: greedy), `top_p`, `n`, `stop`, `seed` and logprobs (chat:
  `logprobs`/`top_logprobs`; completions: `logprobs: k`) are honoured. A request the server cannot
  answer (a malformed body, an unknown model, a prompt that does not fit the context) gets a 4xx with
  an OpenAI-shaped `{"error": {"message", "type", "param", "code"}}` naming the field.
- Auth: when the variable named by `--api-key-env` (default ALIGNFLOW_API_KEY) is set, every request
  needs `Authorization: Bearer <key>` (compared in constant time); the key is never printed.
- Bound to 127.0.0.1; `--host 0.0.0.0` serves other machines (set a key first).

The AI labeler can use it as its judge: `labeler=ai labeler.ai.backend=http
labeler.ai.base_url=http://127.0.0.1:8000/v1 labeler.ai.model=<served name>`.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import importlib.util
import json
import os
import sys
import time
import uuid
from typing import Any, Literal

import flows  # noqa: F401  (environment: telemetry off)
from flows.ops import sources
from flows.ops.engine import Delta, Done, Engine, Request
from stages.runtime.errors import ExpectedFailure

try:  # the request schemas need pydantic (a FastAPI dependency); the engine choice does not
    from pydantic import BaseModel, ConfigDict, Field
except ImportError:  # pragma: no cover
    BaseModel = object  # type: ignore[misc,assignment]


class ServeError(ExpectedFailure, RuntimeError):
    """The server cannot start as asked: the engine's requirement, the port, the source."""


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(Sampling):
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "authentication_error" if self.status == 401 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def build_app(engine: Engine, tokenizer, name: str, context: int, api_key: str | None, default_max_tokens: int = 256):
    from fastapi import FastAPI
    from fastapi import Request as HttpRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    from stages.data.tokens import prompt_ids

    app = FastAPI(title="alignflow serve-model", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return JSONResponse(ApiError(400, f"{where}: {first.get('msg', 'invalid request')}", where).body(), 400)

    @app.middleware("http")
    async def _auth(request: HttpRequest, call_next):
        if api_key is not None and request.url.path != "/health":  # liveness stays open, as vLLM's does
            given = request.headers.get("authorization", "")
            token = given.removeprefix("Bearer ").strip() if given.startswith("Bearer ") else ""
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                return JSONResponse(ApiError(401, "invalid or missing API key", code="invalid_api_key").body(), 401)
        return await call_next(request)

    def check_model(model: str | None) -> None:
        if model not in (None, "", name):
            raise ApiError(404, f"model: {model!r} is not served here; this server serves {name!r}", "model",
                           "model_not_found")  # fmt: skip

    def budget(n_prompt: int, asked: int | None) -> int:
        room = context - n_prompt
        if room < 1:
            raise ApiError(400, f"the prompt has {n_prompt} tokens, which leaves none of the model's context of "
                           f"{context}", "messages", "context_length_exceeded")  # fmt: skip
        if asked is not None and asked > room:
            raise ApiError(400, f"max_tokens: {asked} with a prompt of {n_prompt} tokens exceeds the model's "
                           f"context of {context}", "max_tokens", "context_length_exceeded")  # fmt: skip
        return asked if asked is not None else min(room, default_max_tokens)

    def stops(stop: str | list[str] | None) -> list[str]:
        return [stop] if isinstance(stop, str) else list(stop or [])

    def run(prompts: list[list[int]], n: int, max_tokens: list[int], body: Sampling, top: int):
        """Submit n requests per prompt; an asyncio queue per choice receives its events."""
        loop = asyncio.get_running_loop()
        queues = []
        for ids, budget_ in zip(prompts, max_tokens, strict=True):
            for j in range(n):
                q: asyncio.Queue = asyncio.Queue()
                seed = None if body.seed is None else body.seed + j
                engine.submit(Request(
                    ids, budget_, lambda ev, q=q: loop.call_soon_threadsafe(q.put_nowait, ev),
                    temperature=body.temperature, top_p=body.top_p, stop=stops(body.stop), top_logprobs=top, seed=seed,
                ))  # fmt: skip
                queues.append(q)
        return queues

    async def events(q: asyncio.Queue):
        while True:
            ev = await q.get()
            if isinstance(ev, Exception):
                raise ev
            yield ev
            if isinstance(ev, Done):
                return

    async def collect(q: asyncio.Queue) -> tuple[list, Done]:
        deltas = []
        async for ev in events(q):
            if isinstance(ev, Delta):
                deltas.append(ev)
            else:
                return deltas, ev
        raise RuntimeError("the engine ended a request without its final event")

    def sse(payload: dict | str) -> str:
        return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"

    def usage(dones: list[Done], prompt_tokens: int) -> dict[str, int]:
        completion = sum(d.completion_tokens for d in dones)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": created, "owned_by": "alignflow"}],
        }

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "batches": engine.batches, "largest_batch": engine.largest_batch}

    def chat_logprobs(deltas: list[Delta]) -> dict[str, Any]:
        return {"content": [
            {"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode()),
             "top_logprobs": [{"token": s, "logprob": lp, "bytes": list(s.encode())} for s, lp in t.top]}
            for d in deltas for t in d.tokens
        ]}  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        check_model(body.model)
        ids = prompt_ids(tokenizer, [m.model_dump() for m in body.messages])
        limit = budget(len(ids), body.max_completion_tokens or body.max_tokens)
        top = (body.top_logprobs or 0) if body.logprobs else 0
        queues = run([ids], body.n, [limit], body, top)
        rid, model = f"chatcmpl-{uuid.uuid4().hex}", name
        head = {"id": rid, "created": int(time.time()), "model": model}
        if body.stream:

            async def stream():
                for i, q in enumerate(queues):
                    first = {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    yield sse({**head, "object": "chat.completion.chunk", "choices": [first]})
                    async for ev in events(q):
                        if isinstance(ev, Delta):
                            choice = {"index": i, "delta": {"content": ev.text}, "finish_reason": None}
                            if body.logprobs:
                                choice["logprobs"] = chat_logprobs([ev])
                        else:
                            choice = {"index": i, "delta": {}, "finish_reason": ev.finish_reason}
                        yield sse({**head, "object": "chat.completion.chunk", "choices": [choice]})
                yield sse("[DONE]")

            return StreamingResponse(stream(), media_type="text/event-stream")
        results = [await collect(q) for q in queues]
        choices = []
        for i, (deltas, done) in enumerate(results):
            choices.append({
                "index": i, "message": {"role": "assistant", "content": done.text},
                "logprobs": chat_logprobs(deltas) if body.logprobs else None, "finish_reason": done.finish_reason,
            })  # fmt: skip
        return {
            **head,
            "object": "chat.completion",
            "choices": choices,
            "usage": usage([d for _, d in results], len(ids)),
        }

    def completion_logprobs(deltas: list[Delta], start: int) -> dict[str, Any]:
        tokens = [t for d in deltas for t in d.tokens]
        offsets, at = [], start
        for t in tokens:
            offsets.append(at)
            at += len(t.text)
        return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [dict(t.top) for t in tokens], "text_offset": offsets}  # fmt: skip

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_model(body.model)
        if body.echo:
            raise ApiError(400, "echo: not supported by this server", "echo")
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not texts:
            raise ApiError(400, "prompt: must not be an empty list", "prompt")
        prompts = [tokenizer(t)["input_ids"] for t in texts]
        limits = [budget(len(p), body.max_tokens) for p in prompts]
        queues = run(prompts, body.n, limits, body, body.logprobs or 0)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        if body.stream:

            async def stream():
                for i, q in enumerate(queues):
                    async for ev in events(q):
                        if isinstance(ev, Delta):
                            choice = {
                                "index": i,
                                "text": ev.text,
                                "finish_reason": None,
                                "logprobs": completion_logprobs([ev], 0) if body.logprobs is not None else None,
                            }
                        else:
                            choice = {"index": i, "text": "", "finish_reason": ev.finish_reason, "logprobs": None}
                        yield sse({**head, "object": "text_completion", "choices": [choice]})
                yield sse("[DONE]")

            return StreamingResponse(stream(), media_type="text/event-stream")
        results = [await collect(q) for q in queues]
        choices = [
            {"index": i, "text": done.text, "finish_reason": done.finish_reason,
             "logprobs": completion_logprobs(deltas, 0) if body.logprobs is not None else None}
            for i, (deltas, done) in enumerate(results)
        ]  # fmt: skip
        prompt_tokens = sum(len(p) for p in prompts)
        return {
            **head,
            "object": "text_completion",
            "choices": choices,
            "usage": usage([d for _, d in results], prompt_tokens),
        }

    return app


def choose_engine(asked: str) -> str:
    has_gpu = _cuda()
    has_vllm = importlib.util.find_spec("vllm") is not None
    if asked == "vllm" and not (has_gpu and has_vllm):
        missing = " and ".join(x for x, ok in (("a CUDA GPU", has_gpu), ("the vllm package", has_vllm)) if not ok)
        raise ServeError(f"--engine vllm: needs {missing}, which this machine lacks; use --engine transformers")
    if asked == "auto":
        return "vllm" if has_gpu and has_vllm else "transformers"
    return asked


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def serve_vllm(policy: sources.Policy, args: argparse.Namespace, name: str) -> None:  # pragma: no cover (GPU)
    env = dict(os.environ)
    if os.environ.get(args.api_key_env):
        env["VLLM_API_KEY"] = os.environ[args.api_key_env]  # by the environment, never on the command line
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(policy.folder),
               "--served-model-name", name, "--host", args.host, "--port", str(args.port)]  # fmt: skip
    print(f"serving {policy.label} as {name!r} with vLLM at http://{args.host}:{args.port}/v1", flush=True)
    os.execve(sys.executable, command, env)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="alignflow serve-model", description=__doc__.split("\n\n")[0])
    sources.add_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--engine", choices=["auto", "vllm", "transformers"], default="auto")
    parser.add_argument("--served-name", default=None, help="the model name clients ask for (default: --model-name)")
    parser.add_argument("--api-key-env", default="ALIGNFLOW_API_KEY", help="variable holding the bearer key")
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    parser.add_argument("--max-tokens", type=int, default=256, help="a request's budget when it names none")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--debug", action="store_true", help="show an expected failure's stack")
    args = parser.parse_args(argv)
    try:
        if args.max_batch < 1 or args.max_tokens < 1 or not 0 < args.port < 65536:
            raise ServeError("--max-batch and --max-tokens must be >= 1, --port in 1..65535")
        policy = sources.resolve(args)
        name = args.served_name or args.model_name
        engine_kind = choose_engine(args.engine)
        if engine_kind == "vllm":
            serve_vllm(policy, args, name)
        serve_transformers(policy, args, name)
    except ExpectedFailure as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def serve_transformers(policy: sources.Policy, args: argparse.Namespace, name: str) -> None:
    import uvicorn

    remote = args.trust_remote_code
    model, tokenizer, context = sources.load(policy, threads=args.threads, trust_remote_code=remote, device=args.device)
    engine = Engine(model, tokenizer, max_batch=args.max_batch)
    key = os.environ.get(args.api_key_env) or None
    app = build_app(engine, tokenizer, name, context, key, args.max_tokens)
    auth = f"bearer key from ${args.api_key_env}" if key else "no key"
    print(f"serving {policy.label} as {name!r} at http://{args.host}:{args.port}/v1 ({auth})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    engine.close()


if __name__ == "__main__":
    main()
