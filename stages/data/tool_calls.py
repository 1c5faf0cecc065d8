"""Tool calls in text: one format per model for what SFT trains on, what a rollout samples and what a tool
returns (`tool_format`).

A conversation's tool-using turns (the assistant and tool turns after its last user turn, OpenAI's
`tool_calls` and `tool` messages) become one response of segments, trained (what the policy wrote) or
not (what a tool wrote). That is the layout of a multi-turn rollout (`stages/rl/tools.py`), so SFT
teaches the very tokens RL samples. Two formats:

- **the chat template's own** (`Hermes`), where the template renders tool calls as Hermes and Qwen do:
  the policy writes `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` and ends its turn; each
  result comes back as the template renders a `tool` turn (Qwen: a user turn of `<tool_response>`s),
  followed by its generation prompt;
- **a tagged form** (`Tagged`) where the template has none (the embedded model's):

    user: what is 47 plus 85
    assistant: tool_calls=[calculator("47 + 85")]      ->  <call> calculator 47 + 85 </call>   trained
    tool: 132                                          ->   <result> 132 </result>             masked
    assistant: the answer is 132                       ->   the answer is 132 <eos>            trained

  Its four tags are tokens of the tokenizer (`ensure_tool_tags`): the stop token must be one id.

Several calls in one assistant turn: in the tagged form each is followed by its result, as a rollout
runs them; in the template's, the turn's results come back together, as the template renders them.
A tool function receives its arguments as `arguments_text` gives them.
"""

from __future__ import annotations

import functools
import json
from typing import Any

CALL, END_CALL, RESULT, END_RESULT = "<call>", "</call>", "<result>", "</result>"
TAGS = (CALL, END_CALL, RESULT, END_RESULT)
HERMES_CALL, HERMES_END = "<tool_call>", "</tool_call>"


def has_tool_turns(messages: list[dict[str, Any]]) -> bool:
    return any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def arguments_text(arguments: Any) -> str:
    """OpenAI's `arguments` (a JSON object, or its text) as a tool function receives them: an object's one
    value as it is (`{"expression": "47 + 85"}` -> `47 + 85`), otherwise the JSON."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    if isinstance(arguments, dict) and len(arguments) == 1:
        (value,) = arguments.values()
        return value if isinstance(value, str) else json.dumps(value)
    return arguments if isinstance(arguments, str) else json.dumps(arguments, sort_keys=True)


def split_conversation(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(context, rest): the turns up to the last user turn, and the tool-using turns after it."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] in ("user", "system")), default=-1)
    return messages[: last_user + 1], messages[last_user + 1 :]


def call_text(name: str, arguments: str) -> str:
    return f"{CALL} {name} {arguments_text(arguments)} {END_CALL}"


def result_text(result: str) -> str:
    return f" {RESULT} {result} {END_RESULT}"


def tagged_segments(rest: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    """The tool-using turns in the tagged form as (text, trained) segments; the caller adds EOS."""
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
    return segments


def parse_call(text: str) -> tuple[str, str]:
    """(name, arguments) of the last tagged call in `text`; raises ValueError."""
    start = text.rfind(CALL)
    if start < 0:
        raise ValueError(f"no {CALL} before {END_CALL}")
    body = text[start + len(CALL) :].strip()
    if END_CALL in body:
        body = body[: body.index(END_CALL)].strip()
    name, _, arguments = body.partition(" ")
    if not name:
        raise ValueError(f"{CALL} names no tool")
    return name, arguments.strip()


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class Tagged:
    """`<call> name arguments </call>`, answered by ` <result> text </result>`."""

    name = "tagged"

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    @functools.cached_property
    def end_call(self) -> int:
        return tag_ids(self.tokenizer)[END_CALL]  # once: `is_call` reads it for every row of every turn

    def check(self) -> None:
        tag_ids(self.tokenizer)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return (self.end_call,)  # sampling hands over to the tool here

    def is_call(self, turn: list[int]) -> bool:
        return bool(turn) and turn[-1] == self.end_call

    def calls(self, turn: list[int]) -> list[tuple[str, str]]:
        return [parse_call(self.tokenizer.decode(turn, skip_special_tokens=False))]

    def result_ids(self, results: list[str]) -> list[int]:
        return _ids(self.tokenizer, "".join(result_text(r) for r in results))

    def count_calls(self, ids: list[int]) -> int:
        return ids.count(self.end_call)

    def segments(self, context: list[dict], rest: list[dict]) -> list[tuple[list[int], bool]]:
        return [(_ids(self.tokenizer, text), trained) for text, trained in tagged_segments(rest)]


class Hermes:
    """The chat template's own tool calls (Hermes, Qwen): `<tool_call>{JSON}</tool_call>` ends the turn;
    the results come back as the template renders `tool` turns, then its generation prompt."""

    name = "hermes"
    stop_ids = ()  # a call ends the assistant's turn: EOS

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.eos = tokenizer, tokenizer.eos_token_id

    def check(self) -> None:
        self._end_of_turn_tail(
            self._render([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], False)
        )

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def is_call(self, turn: list[int]) -> bool:
        return bool(turn) and turn[-1] == self.eos and HERMES_END in self._text(turn)

    def calls(self, turn: list[int]) -> list[tuple[str, str]]:
        """Every `<tool_call>` of the turn as (name, arguments); raises ValueError on one that is not JSON."""
        out = []
        for block in self._text(turn).split(HERMES_CALL)[1:]:
            body = block.split(HERMES_END)[0].strip()
            try:
                call = json.loads(body)
                out.append((str(call["name"]), arguments_text(call.get("arguments", {}))))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{HERMES_CALL} holds no JSON object with a name: {body[:80]!r}") from None
        if not out:
            raise ValueError(f"{HERMES_END} without {HERMES_CALL}")
        return out

    def count_calls(self, ids: list[int]) -> int:
        return self._text(ids).count(HERMES_END)

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            [_openai(m) for m in messages], tokenize=False, add_generation_prompt=generation_prompt
        )

    def _after(self, before: list[dict], added: list[dict], generation_prompt: bool) -> str:
        """What the template writes for `added` after `before`; ValueError where it rewrites `before`."""
        head, whole = self._render(before, False), self._render(before + added, generation_prompt)
        if not whole.startswith(head):
            raise ValueError("the chat template renders a conversation differently once turns follow")
        return whole[len(head) :]

    def result_ids(self, results: list[str]) -> list[int]:
        """The template's text after an assistant turn that called tools (its end of turn excluded: the policy
        sampled that), the results' tool turns and the generation prompt."""
        call = {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": "{}"}] * len(results)}
        base = [{"role": "user", "content": "q"}, call]
        tail = self._end_of_turn_tail(self._render(base, False))
        return _ids(self.tokenizer, tail + self._after(base, [{"role": "tool", "content": r} for r in results], True))

    def _end_of_turn_tail(self, rendered: str) -> str:
        """What the template writes after the assistant's end-of-turn token (Qwen: a newline)."""
        eos = self.tokenizer.eos_token
        if eos not in rendered:
            raise ValueError(f"the chat template does not end an assistant turn with EOS ({eos!r})")
        return rendered[rendered.rindex(eos) + len(eos) :]

    def segments(self, context: list[dict], rest: list[dict]) -> list[tuple[list[int], bool]]:
        """Each assistant turn trained up to its end-of-turn token (the last one without it: the caller adds
        EOS), each run of tool turns and the template's text around them not."""
        out, before, i, eos = [], list(context), 0, self.tokenizer.eos_token
        while i < len(rest):
            if rest[i]["role"] == "tool":
                j = i
                while j < len(rest) and rest[j]["role"] == "tool":
                    j += 1
                text = self._end_of_turn_tail(self._render(before, False)) + self._after(before, rest[i:j], True)
                out.append((_ids(self.tokenizer, text), False))
                before, i = before + rest[i:j], j
                continue
            head = self._render(before, True) if before else ""  # the prompt: `tokens.prompt_ids`'s text
            whole = self._render(before + [rest[i]], False)
            turn = whole[len(head) :] if whole.startswith(head) else ""
            if eos not in turn:
                raise ValueError("the chat template renders an assistant turn that does not extend its prompt")
            last = i == len(rest) - 1
            out.append((_ids(self.tokenizer, turn[: turn.rindex(eos) + (0 if last else len(eos))]), True))
            before, i = before + [rest[i]], i + 1
        return out


def _openai(message: dict) -> dict:
    """A normalised message as a chat template reads it: tool calls in OpenAI's shape, arguments parsed."""
    if not message.get("tool_calls"):
        return message
    calls = [{"type": "function", "function": {"name": c["name"], "arguments": _parsed(c["arguments"])}}
             for c in message["tool_calls"]]  # fmt: skip
    return {**message, "tool_calls": calls}


def _parsed(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def tool_format(tokenizer) -> Tagged | Hermes:
    """The chat template's own format where it renders `<tool_call>`s, else the tagged form."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    return Hermes(tokenizer) if HERMES_CALL in template else Tagged(tokenizer)


def ensure_tool_tags(tokenizer) -> list[str]:
    """Where the template has no tool format: the tags as tokens of the tokenizer (the model's embeddings
    must then be resized to `len(tokenizer)`); returns those added."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    if HERMES_CALL in template:
        return []
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
        got = _ids(tokenizer, tag)
        if len(got) != 1:
            raise ValueError(
                f"stage.ppo.tools: the policy's tokenizer encodes {tag!r} as {len(got)} tokens, not one; its "
                "demonstrations had no tool calls (prepare adds the tags as tokens when they do)"
            )
        ids[tag] = got[0]
    return ids
