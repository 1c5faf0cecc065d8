"""`make chat` / `alignflow chat`: talk to the champion (or any policy) in the terminal.

    alignflow chat [--source champion|models:/NAME@ALIAS|PATH] [--temperature 0.7] [--system TEXT]

Each answer streams as it is decoded. The conversation is kept and rendered with the model's chat
template every turn (multi-turn); when it outgrows the context, the oldest turns are dropped.
`/reset` starts a new conversation, `/exit` (or Ctrl-D) leaves. `--stats` prints, after each answer,
the prompt's length in tokens, the tokens generated and the speed.
"""

from __future__ import annotations

import argparse
import queue
import sys
import time

import flows  # noqa: F401  (environment: telemetry off)
from flows.serving import policies
from flows.serving.decoder import Decoder, Delta, Done, Request
from stages.runtime.errors import ExpectedFailure

HELP = "/reset starts a new conversation, /exit leaves"


def fit(tokenizer, history: list[dict], context: int, min_room: int = 16) -> list[int]:
    """The conversation's prompt ids, dropping the oldest user/assistant turns (a system message is
    kept) until at least `min_room` tokens of the context are left for the answer."""
    from stages.data.tokens import prompt_ids

    while True:
        ids = prompt_ids(tokenizer, history)
        turns = [i for i, m in enumerate(history) if m["role"] != "system"]
        if len(ids) + min_room <= context or len(turns) <= 1:
            return ids
        del history[turns[0] : turns[1] + 1 if len(turns) > 1 else turns[0] + 1]


def answer(engine: Decoder, ids: list[int], args: argparse.Namespace, room: int, out) -> Done:
    events: queue.Queue = queue.Queue()
    engine.submit(Request(ids, max(1, min(args.max_tokens, room)), events.put, temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed))  # fmt: skip
    while True:
        ev = events.get()
        if isinstance(ev, Exception):
            raise ev
        if isinstance(ev, Delta):
            out.write(ev.text)
            out.flush()
        elif isinstance(ev, Done):
            return ev


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="alignflow chat", description=__doc__.split("\n\n")[0])
    policies.add_arguments(parser)
    parser.add_argument("--system", default=None, help="a system message at the head of every conversation")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stats", action="store_true", help="tokens and speed after each answer")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--debug", action="store_true", help="show an expected failure's stack")
    args = parser.parse_args(argv)
    try:
        if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_tokens < 1:
            raise policies.SourceError("--temperature must be >= 0, --top-p in (0, 1], --max-tokens >= 1")
        policy = policies.resolve(args)
        run(policy, args)
    except ExpectedFailure as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def run(policy: policies.Policy, args: argparse.Namespace) -> None:
    from stages.data.tokens import prompt_ids

    remote = args.trust_remote_code
    model, tokenizer, context = policies.load(
        policy, threads=args.threads, trust_remote_code=remote, device=args.device
    )
    engine = Decoder(model, tokenizer, max_batch=1, window_s=0.0)
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    print(f"chatting with {policy.label}; {HELP}", flush=True)
    try:
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                print()
                break
            if not line:
                continue
            if line == "/exit":
                break
            if line == "/reset":
                history = list(start)
                print("(new conversation)", flush=True)
                continue
            if line.startswith("/"):
                print(f"unknown command {line.split()[0]}; {HELP}", flush=True)
                continue
            turn = {"role": "user", "content": line}
            alone = len(prompt_ids(tokenizer, [*start, turn]))
            if alone >= context:  # this turn alone fills the context: refused, the session goes on
                print(f"error: that message is {alone} tokens with the template; the model's context is "
                      f"{context}: shorten it (the conversation is kept)", file=sys.stderr, flush=True)  # fmt: skip
                continue
            history.append(turn)
            ids = fit(tokenizer, history, context)
            sys.stdout.write("assistant> ")
            began = time.monotonic()
            done = answer(engine, ids, args, context - len(ids), sys.stdout)
            print(flush=True)
            history.append({"role": "assistant", "content": done.text})
            if args.stats:
                rate = done.completion_tokens / max(time.monotonic() - began, 1e-9)
                print(f"({len(ids)} prompt tokens, {done.completion_tokens} generated, {rate:.1f} tokens/s, "
                      f"{done.finish_reason})", flush=True)  # fmt: skip
    finally:
        engine.close()


if __name__ == "__main__":
    main()
