"""Tool calls in text: one tagged form for what SFT trains on, what a rollout samples and what a tool returns.

A policy calls a tool by writing `<call> name arguments </call>`; the tool's result comes back as
` <result> text </result>` and the policy goes on writing. A conversation's tool-using turns (the
assistant and tool turns after its last user turn, OpenAI's `tool_calls` and `tool` messages) render as
one response of segments, trainable (what the policy wrote) or not (what a tool wrote):

    user: what is 47 plus 85
    assistant: tool_calls=[calculator("47 + 85")]      ->  <call> calculator 47 + 85 </call>   trained
    tool: 132                                          ->   <result> 132 </result>             masked
    assistant: the answer is 132                       ->   the answer is 132 <eos>            trained

which is the layout of a multi-turn rollout (`stages/rl/tools.py`), so SFT teaches the very tokens RL
samples. The four tags are tokens of the tokenizer (`ensure_tool_tags`): a stop token must be one id.
Several calls in one assistant turn render in order, each followed by its result, as a rollout runs them.
"""

from __future__ import annotations

import json
from typing import Any

CALL, END_CALL, RESULT, END_RESULT = "<call>", "</call>", "<result>", "</result>"
TAGS = (CALL, END_CALL, RESULT, END_RESULT)


def has_tool_turns(messages: list[dict[str, Any]]) -> bool:
    return any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def arguments_text(arguments: Any) -> str:
    """OpenAI's `arguments` (a JSON object, or its text) as the call's text: an object's one value as
    it is (`{"expression": "47 + 85"}` -> `47 + 85`), otherwise the JSON."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    if isinstance(arguments, dict) and len(arguments) == 1:
        (value,) = arguments.values()
        return value if isinstance(value, str) else json.dumps(value)
    return arguments if isinstance(arguments, str) else json.dumps(arguments, sort_keys=True)


def call_text(name: str, arguments: str) -> str:
    return f"{CALL} {name} {arguments} {END_CALL}"


def result_text(result: str) -> str:
    return f" {RESULT} {result} {END_RESULT}"


def parse_call(text: str) -> tuple[str, str]:
    """(name, arguments) of the last call in `text` (a turn that ends with `</call>`); raises ValueError."""
    start = text.rfind(CALL)
    if start < 0:
        raise ValueError(f"no {CALL} before {END_CALL}")
    body = text[start + len(CALL) :].removesuffix(END_CALL).strip()
    if END_CALL in body:
        body = body[: body.index(END_CALL)].strip()
    name, _, arguments = body.partition(" ")
    if not name:
        raise ValueError(f"{CALL} names no tool")
    return name, arguments.strip()


def split_conversation(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[str, bool]]]:
    """(context, segments): the turns up to the last user turn, and the rest as (text, trainable)
    segments of one response (see the module docstring). The caller adds EOS after the last."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] in ("user", "system")), default=-1)
    context, rest = messages[: last_user + 1], messages[last_user + 1 :]
    segments: list[tuple[str, bool]] = []
    results = [m for m in rest if m["role"] == "tool"]
    for m in rest:
        if m["role"] == "tool":
            continue  # placed after the call it answers
        text = m["content"].strip()
        for call in m.get("tool_calls") or []:
            text = f"{text} {call_text(call['name'], call['arguments'])}".strip()
            segments.append(((" " if segments else "") + text, True))
            if results:
                segments.append((result_text(results.pop(0)["content"]), False))
            text = ""
        if text:
            segments.append(((" " if segments else "") + text, True))
    return context, segments


def ensure_tool_tags(tokenizer) -> list[str]:
    """The tags as tokens of the tokenizer (the model's embeddings must then be resized to
    `len(tokenizer)`); returns those added."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in TAGS if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing)
    return missing


def tag_ids(tokenizer) -> dict[str, int]:
    """Each tag's one token id; a clear error where the tokenizer splits one (its model was not prepared
    on tool-using demonstrations)."""
    ids = {}
    for tag in TAGS:
        got = tokenizer(tag, add_special_tokens=False)["input_ids"]
        if len(got) != 1:
            raise ValueError(
                f"stage.ppo.tools: the policy's tokenizer encodes {tag!r} as {len(got)} tokens, not one; its "
                "demonstrations had no tool calls (prepare adds the tags as tokens when they do)"
            )
        ids[tag] = got[0]
    return ids
