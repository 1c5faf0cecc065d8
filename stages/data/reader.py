"""The data worker: read local JSON, JSONL, Parquet or CSV (gzipped or not), detect the common formats
and normalise each row to one internal schema per kind, validating row by row.

Kinds and their internal schemas:
- `demonstrations`: `{"messages": [{"role", "content"}, ...]}` (multi-turn kept as turns, last turn
  by the assistant) from Alpaca, ShareGPT, OpenAI `messages` or `prompt`/`completion`;
- `preferences`: `{"prompt": [messages], "chosen": str, "rejected": str}` from `chosen`/`rejected`
  with an explicit or implicit prompt, HH-RLHF transcripts, LLaMA-Factory ShareGPT pairs;
- `rankings`: `{"prompt": str, "responses": [str], "ranks": [int]}` (0 = best, ties share a rank)
  from an ordered list, a `ranking` of indices, `ranks`, or `scores` (higher is better);
- `prompts`: `{"prompt": str}`; `unary`: `{"prompt": [messages], "completion": str, "label": bool}`;
  `text`: `{"text": str}` (a pretraining mix).

Image-text rows (LLaMA-Factory's layout): an `images` list of paths, relative to the data file's
folder, absolute, or inline `data:image/...;base64,` URIs, with one `<image>` placeholder per image
in the user turns (a single image without one goes before the first user turn). Every image is
decoded while the file is read and inlined into the row (`stages/data/images.py`), so a missing or
corrupt image is a bad row named by file, line and image path, before any compute.

A bad row is reported as `file:line: field: problem`. `on_error="raise"` stops at the end of
validation with every problem listed (before any training); `"skip"` drops bad rows and counts them,
but still stops when more than `max_bad_fraction` of the rows are bad.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.data import images
from stages.data.tool_calls import has_tool_turns, split_conversation
from stages.runtime.errors import ExpectedFailure
from stages.settings.data import DatasetConfig

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "observation": "user",
    "function_call": "assistant",
}


class RowError(ExpectedFailure, ValueError):
    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(f"{field_name}: {problem}")
        self.field_name, self.problem = field_name, problem


class DataError(ExpectedFailure, ValueError):
    """Every bad row of a file, one `file:line: field: problem` per line."""

    def __init__(self, problems: list[str]) -> None:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        super().__init__("\n".join(shown))
        self.problems = problems


@dataclass
class Loaded:
    rows: list[dict[str, Any]]
    format: str
    bad: int
    problems: list[str]
    lines: list[int] = field(default_factory=list)  # the file line (or row number) of each row


# 1. reading: (line, record) pairs, with line numbers for every file type
PARQUET_MAGIC, GZIP_MAGIC = b"PAR1", b"\x1f\x8b"
FILE_TYPES = tuple(ext + gz for ext in (".json", ".jsonl", ".parquet", ".csv") for gz in ("", ".gz"))


def _whole_file(path: Path, problem: str) -> DataError:
    return DataError([f"{path}:0: -: {problem}"])


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped for `.gz`; a fault of the whole file is one `file:0: -:` line."""
    if path.is_dir():
        raise _whole_file(path, "is a directory, expected a file")
    try:
        raw = path.read_bytes()
    except PermissionError:
        raise _whole_file(path, "cannot be read: permission denied") from None
    except OSError as e:
        raise _whole_file(path, f"cannot be read: {e.strerror or e}") from None
    if not path.name.endswith(".gz"):
        return raw
    if not raw.startswith(GZIP_MAGIC):
        raise _whole_file(path, "is not gzip data, though its name ends in .gz")
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise _whole_file(path, f"corrupt or truncated gzip ({e})") from None


def read_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    path = Path(path)
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    raw = _read_bytes(path)
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not raw.startswith(PARQUET_MAGIC):
            raise _whole_file(path, "is not a Parquet file (no PAR1 header), though its name ends in .parquet")
        try:
            table = pq.read_table(io.BytesIO(raw))
        except (pa.ArrowException, OSError) as e:
            raise _whole_file(path, f"corrupt Parquet file ({e})") from None
        for i, rec in enumerate(table.to_pylist()):
            yield i + 1, rec
        return
    if raw.startswith(PARQUET_MAGIC) or raw.startswith(GZIP_MAGIC):
        kind = "Parquet" if raw.startswith(PARQUET_MAGIC) else "gzip"
        raise _whole_file(path, f"holds {kind} data, not what its extension says ({name.rsplit('.', 1)[-1]})")
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark, as some editors and Excel write, is dropped
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError([f"{path}:{line}: -: not valid UTF-8 (byte {e.start})"]) from None
    if name.endswith(".jsonl"):
        lines = text.splitlines()  # CRLF too
        first = next((line for line in lines if line.strip()), "")
        if first.lstrip().startswith("[") and _is_json(text):
            raise _whole_file(path, "holds one JSON array, not JSON Lines; name it .json")
        for i, line in enumerate(lines, 1):
            if line.strip():
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as e:
                    yield i, RowError("-", f"invalid JSON ({e.msg})")
    elif name.endswith(".json"):
        yield from _json_array(path, text)
    elif name.endswith(".csv"):
        for i, rec in enumerate(csv.DictReader(io.StringIO(text, newline="")), 2):
            yield i, rec
    else:
        raise DataError([f"{path}:0: -: unknown file type; use .json, .jsonl, .parquet or .csv (optionally .gz)"])


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _json_array(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """Elements of a top-level JSON array with the line each starts on."""
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if not text[pos:].startswith("["):
        first = text[pos:].split("\n", 1)[0]
        if first.strip().startswith("{") and _is_json(first) and text[pos:].strip().count("\n"):
            raise _whole_file(path, "holds JSON Lines, not one JSON array; name it .jsonl")
        raise DataError([f"{path}:1: -: a .json file must hold a list of records"])
    pos += 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise DataError([f"{path}:{text.count(chr(10)) + 1}: -: truncated JSON (no closing ']')"])
        if text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError([f"{path}:{e.lineno}: -: invalid JSON ({e.msg})"]) from None
        yield line, obj


# 2. format detection from the first record's keys
def detect_format(rec: dict[str, Any], kind: str) -> str:
    keys = set(rec)
    if kind == "text" or keys == {"text"}:
        return "text"
    if {"conversations", "chosen", "rejected"} <= keys:
        return "sharegpt_pairs"
    if {"chosen", "rejected"} <= keys:
        chosen = rec["chosen"]
        return (
            "hh" if isinstance(chosen, str) and "\n\nHuman:" in chosen and "prompt" not in keys else "chosen_rejected"
        )
    if "responses" in keys:
        return "ranked"
    if "instruction" in keys:
        return "alpaca"
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        return "messages"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if keys == {"prompt"} or kind == "prompts":
        return "prompt"
    raise RowError("-", f"cannot detect the format from keys {sorted(keys)}; set data.format")


# 3. field helpers
def _text(rec: dict[str, Any], key: str, *, allow_empty: bool = False) -> str:
    if key not in rec or rec[key] is None:
        raise RowError(key, "missing")
    value = rec[key]
    if not isinstance(value, str):
        raise RowError(key, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowError(key, "empty")
    return value


def _list(rec: dict[str, Any], key: str) -> list[Any]:
    if key not in rec:
        raise RowError(key, "missing")
    if not isinstance(rec[key], list) or not rec[key]:
        raise RowError(key, f"expected a non-empty list, got {type(rec[key]).__name__}")
    return rec[key]


def _messages(turns: list[Any], key: str, role_key: str, content_key: str) -> list[dict[str, Any]]:
    """Turns as `{"role", "content"}`; OpenAI's tool use kept: an assistant turn's `tool_calls` (as
    `{"name", "arguments"}`, its content then optional) and `tool` turns (`stages/data/tool_calls.py`)."""
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError(f"{key}[{i}]", "expected an object")
        role = _text(turn, role_key)
        role = SHAREGPT_ROLES.get(role, role) if role_key == "from" else role
        if role not in ("system", "user", "assistant", "tool"):
            raise RowError(f"{key}[{i}].{role_key}", f"unknown role {role!r}")
        calls = _tool_calls(turn, f"{key}[{i}]") if role == "assistant" and turn.get("tool_calls") else []
        content = turn.get(content_key) if calls else _text(turn, content_key, allow_empty=role == "tool")
        if content is None:
            content = ""  # OpenAI's: a turn that only calls tools has null content
        if not isinstance(content, str):
            raise RowError(f"{key}[{i}].{content_key}", f"expected a string, got {type(content).__name__}")
        out.append({"role": role, "content": content, **({"tool_calls": calls} if calls else {})})
    return out


def _tool_calls(turn: dict[str, Any], where: str) -> list[dict[str, str]]:
    """An assistant turn's OpenAI `tool_calls`: `[{"function": {"name", "arguments"}}, ...]`."""
    calls = turn["tool_calls"]
    if not isinstance(calls, list):
        raise RowError(f"{where}.tool_calls", f"expected a list, got {type(calls).__name__}")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            raise RowError(f"{where}.tool_calls[{j}].function", "expected an object with name and arguments")
        name = _text(fn, "name")
        if " " in name.strip():
            raise RowError(f"{where}.tool_calls[{j}].function.name", f"{name!r} has a space")
        arguments = fn.get("arguments", "")
        if not isinstance(arguments, str | dict):
            raise RowError(f"{where}.tool_calls[{j}].function.arguments", "expected a JSON string or an object")
        text = arguments if isinstance(arguments, str) else json.dumps(arguments)
        out.append({"name": name.strip(), "arguments": text})  # as given: a template renders the JSON
    return out


def _check_tool_use(msgs: list[dict[str, Any]], key: str, tools: Any) -> None:
    """Every tool turn answers a call, each call has its tool turn, tool use comes after the last user
    turn (the one layout SFT and rollouts share), and each call names a tool of the row's `tools`."""
    if not has_tool_turns(msgs):
        return
    declared = _declared_tools(tools) if tools is not None else None
    last_user = len(split_conversation(msgs)[0]) - 1
    owed = 0
    for i, m in enumerate(msgs):
        if (m["role"] == "tool" or m.get("tool_calls")) and i < last_user:
            raise RowError(f"{key}[{i}]", "tool use before the last user turn is not supported: keep it to the last")
        for j, call in enumerate(m.get("tool_calls") or []):
            if declared is not None and call["name"] not in declared:
                where = f"{key}[{i}].tool_calls[{j}].function.name"
                raise RowError(where, f"{call['name']!r} is not in the row's tools")
        if m["role"] == "tool":
            if owed == 0:
                raise RowError(f"{key}[{i}].role", "a tool turn with no assistant tool call before it")
            owed -= 1
        elif m.get("tool_calls"):
            owed += len(m["tool_calls"])
        elif m["role"] == "assistant" and owed:
            raise RowError(f"{key}[{i}]", f"{owed} tool call(s) before this turn have no tool turn answering")


def _declared_tools(tools: Any) -> set[str]:
    """The names in OpenAI's `tools`: `[{"type": "function", "function": {"name", ...}}, ...]`."""
    if not isinstance(tools, list):
        raise RowError("tools", f"expected a list, got {type(tools).__name__}")
    names = set()
    for j, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict):
            raise RowError(f"tools[{j}].function", "expected an object with a name")
        names.add(_text(fn, "name").strip())
    return names


def _split_hh(chosen: str, rejected: str) -> tuple[list[dict[str, str]], str, str]:
    """HH-RLHF transcripts `\n\nHuman: ... \n\nAssistant: ...`: the shared conversation up to the last
    common `\n\nAssistant:` marker, and the two replies after it.

    Replies may be empty: the HH-RLHF harmless test split has real rows whose chosen reply is
    empty, and those labels are kept.
    """
    marker = "\n\nAssistant:"
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    cut = chosen[:n].rfind(marker)
    if cut < 0:
        raise RowError("chosen", "no '\\n\\nAssistant:' turn shared with rejected")
    turns = []
    for chunk in chosen[:cut].split("\n\nHuman:")[1:]:
        human, *assistant = chunk.split(marker)
        turns.append({"role": "user", "content": human.strip()})
        turns += [{"role": "assistant", "content": a.strip()} for a in assistant]
    if not turns:
        raise RowError("chosen", "no '\\n\\nHuman:' turn")
    return turns, chosen[cut + len(marker) :].strip(), rejected[cut + len(marker) :].strip()


# 4. normalisation, one function per format
def normalise_record(rec: dict[str, Any], fmt: str, kind: str) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise RowError("-", f"expected an object, got {type(rec).__name__}")
    if fmt == "text":
        return {"text": _text(rec, "text")}
    if fmt == "alpaca":
        instruction, extra = _text(rec, "instruction"), _text(rec, "input", allow_empty=True) if "input" in rec else ""
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        history = []
        for i, pair in enumerate(rec.get("history") or []):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise RowError(f"history[{i}]", "expected [user, assistant] strings")
            history += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        if kind == "prompts":
            return {"prompt": prompt}
        return {
            "messages": history
            + [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(rec, "output")}]
        }
    if fmt in ("sharegpt", "messages"):
        key, role_key, content_key = (
            ("conversations", "from", "value") if fmt == "sharegpt" else ("messages", "role", "content")
        )
        msgs = _messages(_list(rec, key), key, role_key, content_key)
        _check_tool_use(msgs, key, rec.get("tools"))
        if kind == "prompts":  # a conversation prompt; a trailing assistant turn is not part of it
            context = msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs
            context = split_conversation(context)[0] if has_tool_turns(context) else context
            if not context:
                raise RowError(key, "no user turn to use as the prompt")
            return {"prompt": context}
        if kind == "unary":
            if msgs[-1]["role"] != "assistant":
                raise RowError(key, "the last turn must be the assistant's")
            if not isinstance(rec.get("label"), bool):
                raise RowError("label", f"expected true or false, got {rec.get('label')!r}")
            return {"prompt": msgs[:-1], "completion": msgs[-1]["content"], "label": rec["label"]}
        if msgs[-1]["role"] != "assistant" or msgs[-1].get("tool_calls"):
            raise RowError(key, "the last turn must be the assistant's (an answer, not a tool call)")
        return {"messages": msgs}
    if fmt == "prompt_completion":
        prompt, completion = _text(rec, "prompt"), _text(rec, "completion")
        if kind == "unary":
            if not isinstance(rec.get("label"), bool):
                raise RowError("label", f"expected true or false, got {rec.get('label')!r}")
            return {"prompt": [{"role": "user", "content": prompt}], "completion": completion, "label": rec["label"]}
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]}
    if fmt == "prompt":
        return {"prompt": _text(rec, "prompt")}
    if fmt == "sharegpt_pairs":
        context = _messages(_list(rec, "conversations"), "conversations", "from", "value")
        pair = {}
        for key in ("chosen", "rejected"):
            value = rec.get(key)
            if not isinstance(value, dict):
                raise RowError(key, "expected an object with from/value")
            pair[key] = _text(value, "value")
        return {"prompt": context, **pair}
    if fmt == "hh":
        context, chosen, rejected = _split_hh(_text(rec, "chosen"), _text(rec, "rejected"))
        return {"prompt": context, "chosen": chosen, "rejected": rejected}
    if fmt == "chosen_rejected":
        chosen, rejected = _text(rec, "chosen"), _text(rec, "rejected")
        prompt = rec.get("prompt")
        if prompt is None:  # implicit prompt: the common prefix of both
            n = 0
            while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
                n += 1
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
            if not prompt.strip():
                raise RowError("prompt", "missing, and chosen/rejected share no prefix to take it from")
        elif not isinstance(prompt, str):
            raise RowError("prompt", f"expected a string, got {type(prompt).__name__}")
        if not chosen.strip() or not rejected.strip():
            raise RowError("chosen" if not chosen.strip() else "rejected", "empty")
        return {"prompt": [{"role": "user", "content": prompt}], "chosen": chosen, "rejected": rejected}
    if fmt == "ranked":
        return _ranked(rec)
    raise RowError("-", f"format {fmt!r} cannot give kind {kind!r}")


def _refuse_degenerate(row: dict[str, Any]) -> None:
    """A comparison that carries no training signal is a bad row (`keep_degenerate` keeps it)."""
    if "chosen" in row and row["chosen"].strip() == row["rejected"].strip():
        raise RowError("rejected", "same as chosen: the pair carries no preference")
    if "responses" in row:
        for i, text in enumerate(row["responses"]):
            if not text.strip():
                raise RowError(f"responses[{i}]", "empty")
        if len(set(row["ranks"])) == 1:
            raise RowError("ranks", "every response ties: the ranking carries no preference")


def _ranked(rec: dict[str, Any]) -> dict[str, Any]:
    prompt = _text(rec, "prompt")
    raw = _list(rec, "responses")
    ids, texts = [], []
    # plain strings, or {"id", "text"} objects; a sampled response may be empty (the policy said
    # nothing at all) and rankers can still rank it
    for i, r in enumerate(raw):
        if isinstance(r, dict):
            ids.append(str(r.get("id", i)))
            texts.append(_text(r, "text", allow_empty=True))
        elif isinstance(r, str):
            ids.append(str(i))
            texts.append(r)
        else:
            raise RowError(f"responses[{i}]", "expected a string or an {id, text} object")
    if len(set(ids)) != len(ids):
        raise RowError("responses", f"duplicated response ids {sorted({x for x in ids if ids.count(x) > 1})}")
    if len(texts) < 2:
        raise RowError("responses", "a ranking needs at least 2 responses")
    k = len(texts)
    if "ranking" in rec:  # ids or indices, best to worst
        order = _list(rec, "ranking")
        index = {x: i for i, x in enumerate(ids)}
        positions = []
        for j, x in enumerate(order):
            if str(x) not in index:
                raise RowError(f"ranking[{j}]", f"names unknown response {x!r}")
            positions.append(index[str(x)])
        if sorted(positions) != list(range(k)):
            raise RowError("ranking", "must name every response exactly once")
        ranks = [0] * k
        for rank, i in enumerate(positions):
            ranks[i] = rank
    elif "ranks" in rec:
        ranks = _list(rec, "ranks")
        if len(ranks) != k or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
            raise RowError("ranks", f"expected {k} integers")
    elif "scores" in rec:
        scores = _list(rec, "scores")
        if len(scores) != k or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
            raise RowError("scores", f"expected {k} numbers")
        distinct = sorted(set(scores), reverse=True)
        ranks = [distinct.index(s) for s in scores]
    else:  # the responses are listed best to worst
        ranks = list(range(k))
    return {"prompt": prompt, "responses": texts, "ranks": ranks}


def _hub_records(cfg: DatasetConfig) -> Iterator[tuple[int, Any]]:
    """Rows of a `datasets` hub id or dataset folder (`cfg.split`), numbered from 1."""
    try:
        from datasets import load_dataset

        data = load_dataset(cfg.path, split=cfg.split)
    except Exception as e:  # offline hub, unknown id, missing split: one clear line, no traceback
        raise DataError(
            [
                f"{cfg.path}:0: path: not a local file, and `datasets` could not load it as a hub id or dataset "
                f"folder (split {cfg.split!r}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ]
        ) from None
    yield from enumerate(data, 1)


def load(cfg: DatasetConfig) -> Loaded:
    """Read, detect, normalise and validate every row of `cfg.path`: a local file, or else a
    `datasets` hub id (when a hub is reachable) or a dataset folder, read through `load_dataset`."""
    path = Path(cfg.path)
    if path.is_file() or (path.is_dir() and path.name.endswith(FILE_TYPES)):
        records = read_records(path)  # a folder named like a data file is an error of its own
    elif path.is_dir() or (cfg.path.count("/") == 1 and not path.suffix and not cfg.path.startswith((".", "/"))):
        records = _hub_records(cfg)
    else:
        raise DataError([f"{path}:0: path: no such file (data.path)"])
    rows, problems, lines = [], [], []
    fmt = None if cfg.format == "auto" else cfg.format
    seen_ids: dict[str, int] = {}
    total = 0
    for line, rec in records:
        total += 1
        try:
            if isinstance(rec, RowError):
                raise rec
            if cfg.columns and isinstance(rec, dict):
                rec = {**rec, **{name: rec[col] for name, col in cfg.columns.items() if col in rec}}
            if fmt is None:
                fmt = detect_format(rec, cfg.kind)
            if isinstance(rec, dict) and "id" in rec:
                key = str(rec["id"])
                if key in seen_ids:
                    raise RowError("id", f"duplicated id {key!r} (first on line {seen_ids[key]})")
                seen_ids[key] = line
            row = normalise_record(rec, fmt, cfg.kind)
            if isinstance(rec, dict) and rec.get("images"):  # image-text rows (LLaMA-Factory's `images` column)
                if cfg.kind == "text":
                    raise RowError("images", "raw text for pretraining takes no images")
                try:
                    row = images.attach(row, rec["images"], path.parent)
                except images.ImageError as err:
                    raise RowError("images", str(err)) from None
            if not cfg.keep_degenerate:
                _refuse_degenerate(row)
            rows.append(row)
            lines.append(line)
        except RowError as e:
            problems.append(f"{path}:{line}: {e.field_name}: {e.problem}")
    if total == 0:
        raise DataError([f"{path}:0: -: no rows"])
    if problems and (cfg.on_error == "raise" or len(problems) > cfg.max_bad_fraction * total):
        if cfg.on_error == "skip":
            problems.append(
                f"{path}: {len(problems)} of {total} rows are bad, above data.max_bad_fraction={cfg.max_bad_fraction}"
            )
        raise DataError(problems)
    return Loaded(rows=rows, format=fmt or "", bad=len(problems), problems=problems, lines=lines)


def as_ranking_rows(rows: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """Preference or ranking rows in the comparisons stage's layout (`prompt`, `responses`,
    `finished`, `ranks`): a chosen/rejected pair is a K = 2 ranking, and every response is finished."""
    if kind == "preferences":
        return [
            {
                "prompt": r["prompt"],
                "responses": [r["chosen"], r["rejected"]],
                "finished": [True, True],
                "ranks": [0, 1],
                **({"source": r["source"]} if "source" in r else {}),
            }
            for r in rows
        ]
    if kind == "rankings":
        return [{**r, "finished": [True] * len(r["responses"])} for r in rows]
    if kind == "unary":  # thumbs-up/down labels (KTO): one group per prompt, its responses unranked
        groups: dict[str, dict[str, Any]] = {}
        for r in rows:
            key = json.dumps(r["prompt"], sort_keys=True)
            group = groups.setdefault(key, {"prompt": r["prompt"], "responses": [], "thumbs": []})
            group["responses"].append(r["completion"])
            group["thumbs"].append(bool(r["label"]))
            if "source" in r:
                group.setdefault("source", r["source"])
        return [
            {**g, "finished": [True] * len(g["responses"]), "ranks": [0 if t else 1 for t in g["thumbs"]]}
            for g in groups.values()
        ]  # ranks: every desirable response above every undesirable one, ties within each
    raise ValueError(f"data.kind: {kind!r} gives no comparisons (use preferences, rankings or unary)")
