"""Multi-turn tool use in rollouts (`stage.ppo.tools`): the policy writes, calls a tool, reads its result
and writes on, up to `stage.ppo.max_tool_calls` calls per response.

A tool is a Python function named in config as reward functions are (`package.module:name`, importable
from the run's directory; its source joins the stage's cache key):

    name(arguments: str) -> str

The policy calls it in its chat template's tool format, or, where the template has none, by writing
`<call> name arguments </call>` (`stages/data/tool_calls.py`). Sampling stops at the call; it is parsed,
the function runs, and its result is appended to the response (` <result> text </result>`, or the
template's tool turn and generation prompt), its tokens marked in the rollout's `tool_mask`. Sampling
then resumes from the whole context. The tool's tokens are what the policy reads, never what it is
trained on: `Rollout.loss_mask` drops them from the policy loss, the KL (in the reward and as a loss),
the entropy and every statistic over response tokens. A tool that raises, an unknown tool name or a
malformed call comes back as an `error: ...` result the policy reads (as verl's and OpenAI's tool
loops do); they are counted. A call past the limit ends the response unanswered. The response budget
(`max_new_tokens`) covers both the policy's and the tools' tokens.

Shipped: `stages.rl.tools:calculator`, the embedded tool task's (`data=embedded_calculator`).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

import torch

from stages.data.tool_calls import Hermes, Tagged, tool_format
from stages.models.compute import model_device
from stages.models.modeling import Rollout, encode_queries, response_rollout, sample_ids
from stages.rl import rewards

KEY = "stage.ppo.tools"
ToolFormat = Tagged | Hermes
MAX_OPERAND = 10**12  # the calculator's bound: no client makes it multiply huge numbers
_EXPRESSION = re.compile(r"^\s*(-?\d+)\s*([+*-])\s*(-?\d+)\s*$")


def calculator(arguments: str) -> str:
    """`a + b`, `a - b` or `a * b` of two integers, evaluated exactly (no `eval`)."""
    match = _EXPRESSION.match(arguments)
    if match is None:
        raise ValueError(f"not 'a + b', 'a - b' or 'a * b': {arguments!r}")
    a, op, b = int(match[1]), match[2], int(match[3])
    if max(abs(a), abs(b)) > MAX_OPERAND:
        raise ValueError(f"an operand above {MAX_OPERAND}")
    return str(a + b if op == "+" else a - b if op == "-" else a * b)


@dataclass
class Toolbox:
    """The configured tools by the name a call uses (the function's name in its spec), and counts of
    what they were asked."""

    functions: dict
    calls: int = 0
    errors: int = 0
    by_name: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, specs: list[str]) -> Toolbox:
        functions = {}
        for i, spec in enumerate(specs):
            key = f"{KEY}[{i}]"
            name = rewards.parts(spec, key)[1]
            if name in functions:
                raise ValueError(f"{key}: a second tool named {name!r}; a call names its tool by this name")
            functions[name] = rewards.load(spec, key)
        return cls(functions)

    def results(self, fmt: ToolFormat, turn: list[int]) -> list[str]:
        """The results of the calls that end `turn` (one `error: ...` result where they cannot be read)."""
        try:
            calls = fmt.calls(turn)
        except ValueError as e:
            self.calls, self.errors = self.calls + 1, self.errors + 1
            return [f"error: {e}"]
        return [self.run(name, arguments) for name, arguments in calls]

    def run(self, name: str, arguments: str) -> str:
        """One call's result text (an `error: ...` text where it fails)."""
        self.calls += 1
        try:
            if name not in self.functions:
                raise ValueError(f"unknown tool {name!r} (tools: {', '.join(sorted(self.functions))})")
            self.by_name[name] = self.by_name.get(name, 0) + 1
            return str(self.functions[name](arguments))
        except Exception as e:  # noqa: BLE001 - the policy reads its failure, as from any tool
            self.errors += 1
            return f"error: {e}"


@torch.no_grad()
def sample_with_tools(model, tokenizer, prompts: list, toolbox: Toolbox, *, max_calls: int, max_new_tokens: int,
                      max_prompt_length: int | None = None, **sampling) -> Rollout:  # fmt: skip
    """Multi-turn responses to `prompts` (see the module docstring): a `Rollout` whose `tool_mask` marks
    the tools' tokens. `sampling`: `sample_ids`' temperature, top_p and precision."""
    query, query_mask, images = encode_queries(tokenizer, prompts, max_prompt_length, device=model_device(model))
    if images is not None:
        raise ValueError(f"{KEY}: prompts with images are not sampled with tools")
    fmt, eos = tool_format(tokenizer), tokenizer.eos_token_id
    n = len(prompts)
    rows: list[list[int]] = [[] for _ in range(n)]
    written: list[list[int]] = [[] for _ in range(n)]  # 1 where a tool wrote the token
    calls, finished, active = [0] * n, [False] * n, list(range(n))
    contexts = [q[m.bool()].tolist() for q, m in zip(query, query_mask)]
    while active:
        left = {i: max_new_tokens - len(rows[i]) for i in active}
        turn = _next_turn(model, tokenizer, [contexts[i] + rows[i] for i in active], max(left.values()),
                          fmt.stop_ids, sampling)  # fmt: skip
        still = []
        for i, new in zip(active, turn, strict=True):
            new = new[: left[i]]
            rows[i] += new
            written[i] += [0] * len(new)
            if fmt.is_call(new) and calls[i] < max_calls and len(rows[i]) < max_new_tokens:
                calls[i] += 1
                result = fmt.result_ids(toolbox.results(fmt, new))[: max_new_tokens - len(rows[i])]
                rows[i] += result
                written[i] += [1] * len(result)
                if len(rows[i]) < max_new_tokens:
                    still.append(i)
            else:  # answered, out of budget, or a call past the limit: the response ends here
                finished[i] = bool(new) and new[-1] == eos
        active = still
    rollout = response_rollout(query, query_mask, rows, tokenizer.pad_token_id, finished)
    width = rollout.response.shape[1]
    rollout.tool_mask = torch.tensor(
        [w + [0] * (width - len(w)) for w in written], dtype=torch.long, device=rollout.response.device
    )
    return rollout


def _next_turn(model, tokenizer, contexts: list[list[int]], budget: int, stop_ids: tuple, sampling: dict) -> list:
    """Each context's next turn: tokens up to and including EOS or a stop token, or `budget` of them."""
    width = max(len(c) for c in contexts)
    pad, device = tokenizer.pad_token_id, model_device(model)
    query = torch.tensor([[pad] * (width - len(c)) + c for c in contexts], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts], dtype=torch.long, device=device)
    out = sample_ids(model, tokenizer, query, mask, max_new_tokens=budget, stop_ids=stop_ids, **sampling)
    return [r[m.bool()].tolist() for r, m in zip(out.response, out.response_mask)]


def tool_use(rollout: Rollout, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Per response: whether it read a tool result, and how many calls it wrote."""
    fmt = tool_format(tokenizer)
    rows = [r[m.bool()].tolist() for r, m in zip(rollout.response, rollout.loss_mask)]  # the policy's tokens
    calls = torch.tensor([fmt.count_calls(r) for r in rows], device=rollout.response.device)
    return rollout.tool_mask.any(dim=1), calls


def tool_metrics(rollout: Rollout, tokenizer) -> dict[str, float]:
    """Over a batch: the share of responses that read a tool result, the calls per response and the
    tools' share of response tokens ({} without tools)."""
    if rollout.tool_mask is None:
        return {}
    used, calls = tool_use(rollout, tokenizer)
    token_share = rollout.tool_mask.sum() / rollout.response_mask.sum().clamp(min=1)
    return {"share_using": used.float().mean().item(), "calls": calls.float().mean().item(),
            "token_share": token_share.item()}  # fmt: skip


class ToolRollout:
    """A rollout engine (`stages/rl/rollout.py`'s `HfRollout`) whose responses call `toolbox`'s tools."""

    def __init__(self, engine, toolbox: Toolbox, max_calls: int) -> None:
        self.engine, self.toolbox, self.max_calls = engine, toolbox, max_calls

    def sample(self, tokenizer, prompts: list, *, max_new_tokens: int, temperature=1.0, top_p=1.0,
               max_prompt_length=None) -> Rollout:  # fmt: skip
        kw = {"temperature": temperature, "top_p": top_p, "precision": self.engine.precision}
        return sample_with_tools(self.engine.model, tokenizer, prompts, self.toolbox, max_calls=self.max_calls,
                                 max_new_tokens=max_new_tokens, max_prompt_length=max_prompt_length, **kw)  # fmt: skip

    def sync(self, gathered=contextlib.nullcontext) -> None:
        self.engine.sync(gathered)
