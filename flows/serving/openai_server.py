"""`make serve-model` / `alignflow serve-model`: the champion (or any policy) behind an OpenAI-compatible
API on 127.0.0.1.

    alignflow serve-model [--source champion|models:/NAME@ALIAS|PATH] [--port 8000] [--engine auto]

- `--engine vllm`: vLLM's own OpenAI server (needs a CUDA GPU and the `vllm` package); `auto` picks it
  where both are present, else `transformers`: the FastAPI + uvicorn server here, on the batched
  decoder of `flows/serving/decoder.py`.
- Endpoints: `GET /v1/models`, `POST /v1/chat/completions` (the model's chat template), `POST
  /v1/completions` (raw text); `stream: true` answers as server-sent events ending in `data: [DONE]`.
  `max_tokens`, `temperature` (0: greedy), `top_p`, `n`, `stop`, `seed` and logprobs (chat:
  `logprobs`/`top_logprobs`; completions: `logprobs: k`) are honoured. A request the server cannot
  answer (a malformed body, an unknown model, a prompt that does not fit the context) gets a 4xx with
  an OpenAI-shaped `{"error": {"message", "type", "param", "code"}}` naming the field; so does every
  other non-2xx answer (an unreadable body, an unknown route or method, 413, 429, 500).
- Limits (`--max-body-bytes`, `--max-choices`, `--max-waiting`): a body over 1 MiB is refused 413, more
  than 64 sequences (prompts x n) in one request 400, and more than 256 sequences queued or decoding
  429 with `Retry-After`. Prompts are tokenised off the event loop. A sampling parameter anywhere in
  its accepted range decodes (a temperature under 1e-5 is greedy, any seed is reduced into torch's
  range), and a request that breaks the batched decoder fails alone: the others are decoded again.
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
from dataclasses import dataclass
from typing import Any, Literal

import flows  # noqa: F401  (environment: telemetry off)
from flows.serving import policies
from flows.serving.decoder import Decoder, Delta, Done, Request
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


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False  # as OpenAI: a last chunk with the usage and no choices


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
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


TYPES = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error"}


class ApiError(Exception):
    """Every non-2xx answer, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "server_error" if self.status >= 500 else TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What one client can make the server do (`serve-model --max-*`)."""

    body_bytes: int = 1 << 20  # a request body (413 above it)
    choices: int = 64  # prompts x n in one request (400 above it)
    waiting: int = 256  # sequences queued or decoding (429 with Retry-After above it)


def build_app(
    engine: Decoder,
    tokenizer,
    name: str,
    context: int,
    api_key: str | None,
    default_max_tokens: int = 256,
    limits: Limits = Limits(),
):
    from fastapi import FastAPI
    from fastapi import Request as HttpRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    from stages.data.tokens import prompt_ids

    app = FastAPI(title="alignflow serve-model", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=limits.body_bytes)
    created = int(time.time())
    in_flight = {"sequences": 0}

    def shaped(e: ApiError, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return shaped(e, {"Retry-After": "1"} if e.status == 429 else None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":  # its loc is a byte offset, not a field
            return shaped(
                ApiError(400, f"body: not valid JSON ({first.get('msg', 'parse error')})", None, "json_invalid")
            )
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return shaped(ApiError(400, f"{where}: {first.get('msg', 'invalid request')}", where))

    @app.exception_handler(HTTPException)
    async def _http(request: HttpRequest, e: HTTPException):
        messages = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        message = messages.get(e.status_code, str(e.detail))
        return shaped(
            ApiError(e.status_code, message, None, {404: "not_found", 405: "method_not_allowed"}.get(e.status_code))
        )

    @app.exception_handler(Exception)
    async def _crash(_, e: Exception):  # a bug or a failed decode: the client still gets the shape
        return shaped(ApiError(500, f"the server failed this request: {type(e).__name__}: {e}", None, "server_error"))

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

    def budget(n_prompt: int, asked: int | None, field: str) -> int:
        room = context - n_prompt
        if room < 1:
            raise ApiError(400, f"{field}: the prompt has {n_prompt} tokens, which leaves none of the model's "
                           f"context of {context}", field, "context_length_exceeded")  # fmt: skip
        if asked is not None and asked > room:
            raise ApiError(400, f"max_tokens: {asked} with a prompt of {n_prompt} tokens exceeds the model's "
                           f"context of {context}", "max_tokens", "context_length_exceeded")  # fmt: skip
        return asked if asked is not None else min(room, default_max_tokens)

    def stops(stop: str | list[str] | None) -> list[str]:
        return [stop] if isinstance(stop, str) else list(stop or [])

    def admit(sequences: int) -> None:
        """Refuse more sequences in one request than `limits.choices`, or more than the queue holds (429)."""
        if sequences > limits.choices:
            raise ApiError(400, f"n: {sequences} sequences (prompts x n) in one request; at most {limits.choices}",
                           "n", "too_many_choices")  # fmt: skip
        if in_flight["sequences"] + sequences > limits.waiting:
            raise ApiError(429, f"the server is decoding {in_flight['sequences']} sequences (at most "
                           f"{limits.waiting}); retry shortly", None, "server_busy")  # fmt: skip

    def run(prompts: list[list[int]], n: int, max_tokens: list[int], body: Sampling, top: int, texts: bool):
        """Submit n requests per prompt; an asyncio queue per choice receives its events."""
        admit(len(prompts) * n)
        loop = asyncio.get_running_loop()

        def deliver(ev, q: asyncio.Queue) -> None:
            if isinstance(ev, (Done, Exception)):
                in_flight["sequences"] -= 1
            q.put_nowait(ev)

        queues = []
        for ids, budget_ in zip(prompts, max_tokens, strict=True):
            for j in range(n):
                q: asyncio.Queue = asyncio.Queue()
                seed = None if body.seed is None else body.seed + j
                in_flight["sequences"] += 1
                engine.submit(Request(
                    ids, budget_, lambda ev, q=q: loop.call_soon_threadsafe(deliver, ev, q),
                    temperature=body.temperature, top_p=body.top_p, stop=stops(body.stop), top_logprobs=top, seed=seed,
                    token_texts=texts,
                ))  # fmt: skip
                queues.append(q)
        return queues

    async def stream_errors(chunks):
        """A stream whose decode fails mid-way ends with an error event in the shape, then [DONE]."""
        try:
            async for chunk in chunks:
                yield chunk
        except Exception as e:
            yield sse(ApiError(500, f"the server failed this request: {type(e).__name__}: {e}").body())
            yield sse("[DONE]")

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
        messages = [m.model_dump() for m in body.messages]
        ids = await asyncio.to_thread(prompt_ids, tokenizer, messages)  # a long prompt never blocks the loop
        limit = budget(len(ids), body.max_completion_tokens or body.max_tokens, "messages")
        top = (body.top_logprobs or 0) if body.logprobs else 0
        queues = run([ids], body.n, [limit], body, top, body.logprobs)
        rid, model = f"chatcmpl-{uuid.uuid4().hex}", name
        head = {"id": rid, "created": int(time.time()), "model": model}
        if body.stream:

            async def stream():
                dones = []
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
                            dones.append(ev)
                        yield sse({**head, "object": "chat.completion.chunk", "choices": [choice]})
                if body.stream_options is not None and body.stream_options.include_usage:
                    yield sse(
                        {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(dones, len(ids))}
                    )
                yield sse("[DONE]")

            return StreamingResponse(stream_errors(stream()), media_type="text/event-stream")
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
        admit(len(texts) * body.n)  # before any tokenising
        prompts = await asyncio.to_thread(lambda: [tokenizer(t)["input_ids"] for t in texts])
        budgets = [budget(len(p), body.max_tokens, "prompt") for p in prompts]
        queues = run(prompts, body.n, budgets, body, body.logprobs or 0, body.logprobs is not None)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        if body.stream:

            async def stream():
                dones = []
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
                            dones.append(ev)
                        yield sse({**head, "object": "text_completion", "choices": [choice]})
                if body.stream_options is not None and body.stream_options.include_usage:
                    total = sum(len(p) for p in prompts)
                    yield sse({**head, "object": "text_completion", "choices": [], "usage": usage(dones, total)})
                yield sse("[DONE]")

            return StreamingResponse(stream_errors(stream()), media_type="text/event-stream")
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


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 in the error shape, by its
    Content-Length before any byte is read, or as it streams in without one."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self.refuse(send)
        seen = {"bytes": 0, "refused": False}

        async def counted():
            message = await receive()
            seen["bytes"] += len(message.get("body", b""))
            if seen["bytes"] > self.limit:
                seen["refused"] = True
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self.refuse(send)

    async def refuse(self, send) -> None:
        body = json.dumps(ApiError(413, f"the request body exceeds {self.limit} bytes", None, "body_too_large").body())
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body.encode()})


class _TooLarge(Exception):
    pass


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


def serve_vllm(policy: policies.Policy, args: argparse.Namespace, name: str) -> None:  # pragma: no cover (GPU)
    env = dict(os.environ)
    if os.environ.get(args.api_key_env):
        env["VLLM_API_KEY"] = os.environ[args.api_key_env]  # by the environment, never on the command line
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(policy.folder),
               "--served-model-name", name, "--host", args.host, "--port", str(args.port)]  # fmt: skip
    print(f"serving {policy.label} as {name!r} with vLLM at http://{args.host}:{args.port}/v1", flush=True)
    os.execve(sys.executable, command, env)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="alignflow serve-model", description=__doc__.split("\n\n")[0])
    policies.add_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--engine", choices=["auto", "vllm", "transformers"], default="auto")
    parser.add_argument("--served-name", default=None, help="the model name clients ask for (default: --model-name)")
    parser.add_argument("--api-key-env", default="ALIGNFLOW_API_KEY", help="variable holding the bearer key")
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    parser.add_argument("--max-tokens", type=int, default=256, help="a request's budget when it names none")
    parser.add_argument("--max-body-bytes", type=int, default=Limits.body_bytes, help="a request body's size (413)")
    parser.add_argument("--max-choices", type=int, default=Limits.choices, help="prompts x n in one request (400)")
    parser.add_argument("--max-waiting", type=int, default=Limits.waiting, help="sequences queued or decoding (429)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--debug", action="store_true", help="show an expected failure's stack")
    args = parser.parse_args(argv)
    try:
        counts = (args.max_batch, args.max_tokens, args.max_body_bytes, args.max_choices, args.max_waiting)
        if min(counts) < 1 or not 0 < args.port < 65536:
            raise ServeError("--max-batch, --max-tokens and the --max-* limits must be >= 1, --port in 1..65535")
        policy = policies.resolve(args)
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


def check_port(host: str, port: int) -> None:
    """A port another process holds (or this user may not bind) is refused in one line, before the model loads."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a closing port is free
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ServeError(
                f"--port {port}: cannot listen on {host}:{port} ({e.strerror or e}); choose another --port"
            ) from None


def serve_transformers(policy: policies.Policy, args: argparse.Namespace, name: str) -> None:
    import uvicorn

    check_port(args.host, args.port)
    remote = args.trust_remote_code
    model, tokenizer, context = policies.load(
        policy, threads=args.threads, trust_remote_code=remote, device=args.device
    )
    engine = Decoder(model, tokenizer, max_batch=args.max_batch)
    key = os.environ.get(args.api_key_env) or None
    limits = Limits(body_bytes=args.max_body_bytes, choices=args.max_choices, waiting=args.max_waiting)
    app = build_app(engine, tokenizer, name, context, key, args.max_tokens, limits)
    auth = f"bearer key from ${args.api_key_env}" if key else "no key"
    print(f"serving {policy.label} as {name!r} at http://{args.host}:{args.port}/v1 ({auth})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    engine.close()


if __name__ == "__main__":
    main()
