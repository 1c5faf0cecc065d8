"""Multi-turn tool use: the tagged call format, OpenAI tool messages in the data worker, SFT's and PPO's
masks (a tool's tokens get zero weight in every loss), the tool loop and the calculator task."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from stages.data import calculator, tool_calls
from stages.data.reader import RowError, normalise_record
from stages.models.modeling import Rollout
from stages.rl import ppo_math as pm
from stages.rl import ppo_update, tools
from stages.settings.models import PeftConfig, Tuning
from stages.settings.recipe import AGGREGATIONS, RATIO_LEVELS, PpoConfig

CALL = {"id": "c0", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "47 + 85"}'}}
TOOL_ROW = {
    "messages": [
        {"role": "user", "content": "what is 47 plus 85"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "c0", "content": "132"},
        {"role": "assistant", "content": "the answer is 132"},
    ],
    "tools": [calculator.SCHEMA],
}


def test_the_calculator_by_hand_and_its_refusals():
    assert tools.calculator("47 + 85") == "132"
    assert tools.calculator(" 7 - 10 ") == "-3"
    assert tools.calculator("12 * 12") == "144"
    for bad in ("47 +", "import os", "2 ** 8", f"{10**13} + 1"):
        with pytest.raises(ValueError):
            tools.calculator(bad)


def test_a_toolbox_runs_calls_and_returns_failures_as_results():
    box = tools.Toolbox.load(["stages.rl.tools:calculator"])
    fmt = tool_calls.Tagged(_word_tokenizer())
    turn = lambda text: fmt.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert box.results(fmt, turn("<call> calculator 47 + 85 </call>")) == ["132"]
    assert box.results(fmt, turn("<call> calculator 47 plus 85 </call>"))[0].startswith("error: not 'a + b'")
    assert box.results(fmt, turn("<call> what 1 + 1 </call>")) == ["error: unknown tool 'what' (tools: calculator)"]
    assert box.results(fmt, turn("calculator 1 + 1 </call>")) == ["error: no <call> before </call>"]
    assert (box.calls, box.errors, box.by_name) == (4, 3, {"calculator": 2})


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (["stages.rl.tools"], r"stage.ppo.tools\[0\]: 'stages.rl.tools' is not of the form package.module:name"),
        (["stages.rl.tools:nope"], r"stage.ppo.tools\[0\]: module 'stages.rl.tools' has no attribute 'nope'"),
        (["no_such_module:f"], r"stage.ppo.tools\[0\]: no module named 'no_such_module'"),
        (["stages.rl.tools:calculator", "stages.rl.tools:calculator"], r"stage.ppo.tools\[1\]: a second tool"),
    ],
)
def test_a_bad_tool_is_named_by_its_key(specs, message):
    with pytest.raises(ValueError, match=message):
        tools.Toolbox.load(specs)


def test_tools_refuse_what_the_tool_loop_cannot_do():
    base = {"advantage": "grpo", "samples_per_prompt": 2, "kl_penalty": "loss", "tools": ["stages.rl.tools:calculator"]}
    PpoConfig(**base)
    for extra, message in (
        ({"advantage": "gae", "kl_penalty": "reward", "samples_per_prompt": 1}, "advantage=gae"),
        ({"async_rollouts": 1}, "async_rollouts"),
        ({"generation": "vllm"}, "generation=vllm"),
        ({"watch_every": 2}, "watch_every"),
        ({"tools": ["calculator"]}, r"stage.ppo.tools\[0\]: 'calculator' is not of the form"),
    ):
        with pytest.raises(ValueError, match=message):
            PpoConfig(**{**base, **extra})


def test_openai_tool_messages_become_one_response_of_segments():
    row = normalise_record(TOOL_ROW, "messages", "demonstrations")
    assert row["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [
        {"name": "calculator", "arguments": '{"expression": "47 + 85"}'}]}  # fmt: skip
    context, rest = tool_calls.split_conversation(row["messages"])
    assert context == [{"role": "user", "content": "what is 47 plus 85"}]
    assert tool_calls.tagged_segments(rest) == [
        ("<call> calculator 47 + 85 </call>", True),
        (" <result> 132 </result>", False),
        (" the answer is 132", True),
    ]
    prompt = normalise_record(TOOL_ROW, "messages", "prompts")
    assert prompt == {"prompt": context}  # a tool conversation's prompt is its context


def test_two_calls_in_one_turn_render_each_followed_by_its_result():
    second = {**CALL, "id": "c1", "function": {"name": "calculator", "arguments": {"expression": "1 + 2"}}}
    row = {"messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "both", "tool_calls": [CALL, second]},
        {"role": "tool", "content": "132"}, {"role": "tool", "content": "3"},
        {"role": "assistant", "content": "done"}]}  # fmt: skip
    msgs = normalise_record(row, "messages", "demonstrations")["messages"]
    assert [t for t, _ in tool_calls.tagged_segments(tool_calls.split_conversation(msgs)[1])] == [
        "both <call> calculator 47 + 85 </call>", " <result> 132 </result>",
        " <call> calculator 1 + 2 </call>", " <result> 3 </result>", " done"]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        (lambda m: m.pop(2), "messages[2]", "1 tool call(s) before this turn have no tool turn"),
        (lambda m: m.pop(1), "messages[1].role", "a tool turn with no assistant tool call before it"),
        (lambda m: m[1].update(tool_calls=[{"function": {"name": "search", "arguments": "{}"}}]),
         "messages[1].tool_calls[0].function.name", "'search' is not in the row's tools"),
        (lambda m: m[1].update(tool_calls=[{"type": "function"}]), "messages[1].tool_calls[0].function", "expected"),
        (lambda m: m[1].update(tool_calls="calculator"), "messages[1].tool_calls", "expected a list"),
        (lambda m: m.append({"role": "user", "content": "and now?"}) or m.append({"role": "assistant", "content": "x"}),
         "messages[1]", "tool use before the last user turn"),
        (lambda m: m[3].update(role="robot"), "messages[3].role", "unknown role 'robot'"),
    ],
)  # fmt: skip
def test_malformed_tool_use_names_the_field(change, field, problem):
    row = json.loads(json.dumps(TOOL_ROW))
    change(row["messages"])
    with pytest.raises(RowError) as got:
        normalise_record(row, "messages", "demonstrations")
    assert got.value.field_name == field and problem in str(got.value)


def test_a_conversation_ending_in_a_tool_call_is_not_a_demonstration():
    row = json.loads(json.dumps(TOOL_ROW))
    row["messages"] = row["messages"][:2]
    with pytest.raises(RowError, match="an answer, not a tool call"):
        normalise_record(row, "messages", "demonstrations")


def test_sft_trains_on_every_assistant_turn_and_on_no_tool_result(tmp_path):
    """Through trl's own label building: the tool result's tokens are -100, the call and answer are not."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from stages.data.tokens import Budget, fit_rows
    from stages.prepare import build_tokenizer
    from stages.sft import encode_demonstration, token_columns
    from tests.conftest import build_tiny_model

    tok = build_tokenizer([" ".join(calculator.vocabulary())])
    tok.chat_template = None
    from stages.data.tokens import ensure_chat_template

    ensure_chat_template(tok)
    msgs = normalise_record(TOOL_ROW, "messages", "demonstrations")["messages"]
    prompt, response, trained = encode_demonstration(tok, msgs)
    words = tok.convert_ids_to_tokens(response)
    assert words == ["<call>", "calculator", "47", "+", "85", "</call>", "<result>", "132", "</result>",
                     "the", "answer", "is", "132", "<eos>"]  # fmt: skip
    assert trained == [1] * 6 + [0] * 3 + [1] * 5
    encoded = [(prompt, response, trained)]
    fitted = fit_rows([(prompt, [response])], Budget(16, 64), stage="sft")
    model = build_tiny_model(tmp_path / "m", "llama", tokenizer=tok, context=64)
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        completion_only_loss=True,
        max_length=64,
        report_to=[],
        bf16=False,
        use_cpu=True,
    )
    trainer = SFTTrainer(model=str(model), args=args, train_dataset=Dataset.from_dict(token_columns(encoded, fitted)),
                         processing_class=tok)  # fmt: skip
    labels = trainer.train_dataset[0]["labels"]
    n = len(prompt)
    assert labels[:n] == [-100] * n
    assert labels[n:] == [t if w else -100 for t, w in zip(response, trained)]


def _tool_rollout() -> Rollout:
    """Two responses of 10 tokens; row 0 has a tool result at positions 3-5, row 1 ends at position 7."""
    response = torch.arange(20).view(2, 10) + 10
    response_mask = torch.ones(2, 10, dtype=torch.long)
    response_mask[1, 8:] = 0
    tool_mask = torch.zeros(2, 10, dtype=torch.long)
    tool_mask[0, 3:6] = 1
    query = torch.ones(2, 3, dtype=torch.long)
    return Rollout(query, torch.ones_like(query), response, response_mask, torch.ones(2, dtype=torch.bool),
                   tool_mask=tool_mask)  # fmt: skip


def test_critic_free_returns_pass_over_a_tool_turn_by_hand():
    rollout = _tool_rollout()
    rewards = torch.zeros(2, 10)
    rewards[0, 9], rewards[1, 7] = 1.0, 2.0
    got = pm.discounted_returns(rewards, rollout.loss_mask.float(), gamma=0.5)
    # row 0: policy tokens 0-2 and 6-9; the return steps over positions 3-5 undiscounted
    want0 = [0.5**6, 0.5**5, 0.5**4, 0, 0, 0, 0.5**3, 0.5**2, 0.5, 1.0]
    want1 = [2 * 0.5 ** (7 - t) for t in range(8)] + [0, 0]
    assert torch.allclose(got, torch.tensor([want0, want1]))
    assert rollout.select([0]).tool_mask.tolist() == [[0, 0, 0, 1, 1, 1, 0, 0, 0, 0]]


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("level", RATIO_LEVELS)
@pytest.mark.parametrize("kl_penalty", ["loss", "reward"])
def test_a_tool_turn_gets_zero_weight_in_every_loss(aggregation, level, kl_penalty):
    """PPO's own path (`Scored`, `estimate_advantages`, `minibatch_loss`) on a rollout with a tool turn:
    the loss's gradient is zero at the tool's tokens and not at the policy's; the KL and the advantages
    do not move when the tool's tokens' log-probs do."""
    cfg = PpoConfig(advantage="grpo", samples_per_prompt=2, rollouts_per_update=2, minibatch_size=2,
                    kl_penalty=kl_penalty, loss_aggregation=aggregation, ratio_level=level,
                    tools=["stages.rl.tools:calculator"])  # fmt: skip
    rollout, tool = _tool_rollout(), _tool_rollout().tool_mask.bool()
    torch.manual_seed(0)
    old, ref = -torch.rand(2, 10), -torch.rand(2, 10)
    scored = ppo_update.Scored(rollout, torch.tensor([1.0, 0.0]), old, ref, torch.zeros(2, 10), torch.arange(2),
                               ["p", "p"], {})  # fmt: skip
    assert scored.mask.tolist() == rollout.loss_mask.float().tolist() and not scored.mask[tool].any()
    state = SimpleNamespace(kl=pm.KLController(0.1), compute=Tuning(PeftConfig("full")).compute)
    kl, advantages, returns = ppo_update.estimate_advantages(cfg, state, scored, None)
    moved = ppo_update.Scored(rollout, scored.score, old + 5 * tool, ref - 3 * tool, scored.old_values,
                              scored.first_order, scored.prompts, {})  # fmt: skip
    kl2, advantages2, _ = ppo_update.estimate_advantages(cfg, state, moved, None)
    assert torch.equal(kl, kl2) and torch.equal(advantages, advantages2) and not kl[tool].any()
    logp = (old + 0.05 * torch.randn(2, 10)).requires_grad_()
    entropy = torch.rand(2, 10, requires_grad=True)
    state.engine = lambda mb: (logp, entropy, torch.zeros(2, 10))
    loss, values = ppo_update.minibatch_loss(cfg, state, ppo_update.Targets(scored, advantages, returns, None),
                                             torch.arange(2), None, None)  # fmt: skip
    grad_logp, grad_entropy = torch.autograd.grad(loss, [logp, entropy], allow_unused=True)
    assert not grad_logp[tool].any() and grad_logp[~tool & rollout.response_mask.bool()].abs().sum() > 0
    assert grad_entropy is None or not grad_entropy[tool].any()


def _word_tokenizer():
    from stages.data.tokens import ensure_chat_template
    from stages.prepare import build_tokenizer

    tok = build_tokenizer([" ".join(calculator.vocabulary())])
    ensure_chat_template(tok)
    return tok


class ScriptedPolicy:
    """Stands in for `sample_ids`: each prompt's turns, given in advance, cut to the turn's budget."""

    def __init__(self, tok, turns: dict[str, list[str]]) -> None:
        self.tok, self.turns, self.calls = tok, {p: list(ts) for p, ts in turns.items()}, 0

    def __call__(self, model, tokenizer, query, mask, *, max_new_tokens, stop_ids, **kw) -> Rollout:
        self.calls += 1
        out = []
        for q, m in zip(query, mask):
            context = self.tok.decode(q[m.bool()].tolist())
            prompt = next(p for p in self.turns if p in context)
            out.append(self.tok(self.turns[prompt].pop(0), add_special_tokens=False)["input_ids"][:max_new_tokens])
        width = max(len(o) for o in out)
        response = torch.tensor([o + [self.tok.pad_token_id] * (width - len(o)) for o in out])
        lengths = torch.tensor([len(o) for o in out])
        response_mask = (torch.arange(width) < lengths[:, None]).long()
        return Rollout(query, mask, response, response_mask, torch.zeros(len(out), dtype=torch.bool))


def _texts(tok, rollout: Rollout) -> list[str]:
    return [" ".join(tok.convert_ids_to_tokens(r[m.bool()].tolist()))
            for r, m in zip(rollout.response, rollout.response_mask)]  # fmt: skip


def test_the_tool_loop_masks_what_the_tool_wrote_and_ends_past_the_limit(monkeypatch):
    """A scripted policy through `sample_with_tools`: the result's tokens are the tool's output and
    marked in `tool_mask`; a call past `max_calls` ends the response unanswered."""
    tok = _word_tokenizer()
    policy = ScriptedPolicy(tok, {
        "47 plus 85": ["<call> calculator 47 + 85 </call>", "the answer is 132 <eos>"],
        "add 11 and 11": ["<call> calculator 11 + 11 </call>", "<call> calculator 2 + 2 </call>"],
        "what is 10 plus 12": ["the answer is 22 <eos>"],
    })  # fmt: skip
    monkeypatch.setattr(tools, "sample_ids", policy)
    box = tools.Toolbox.load(["stages.rl.tools:calculator"])
    prompts = ["what is 47 plus 85", "add 11 and 11", "what is 10 plus 12"]
    rollout = tools.sample_with_tools(torch.nn.Linear(1, 1), tok, prompts, box, max_calls=1, max_new_tokens=24)
    texts = _texts(tok, rollout)
    assert texts[0] == "<call> calculator 47 + 85 </call> <result> 132 </result> the answer is 132 <eos>"
    assert texts[1] == "<call> calculator 11 + 11 </call> <result> 22 </result> <call> calculator 2 + 2 </call>"
    assert texts[2] == "the answer is 22 <eos>"
    words = texts[0].split()
    assert [w for w, t in zip(words, rollout.tool_mask[0].tolist()) if t] == ["<result>", "132", "</result>"]
    assert rollout.tool_mask[1].tolist()[6:9] == [1, 1, 1] and rollout.tool_mask[1].sum() == 3
    assert rollout.finished.tolist() == [True, False, True] and rollout.tool_mask[2].sum() == 0
    assert policy.calls == 2 and box.calls == 2  # the third prompt answered in the first turn
    used, calls = tools.tool_use(rollout, tok)
    assert used.tolist() == [True, True, False] and calls.tolist() == [1, 2, 0]


def test_the_tool_loop_keeps_the_response_budget(monkeypatch):
    """The budget covers the policy's and the tool's tokens: a result is cut where the budget ends."""
    tok = _word_tokenizer()
    monkeypatch.setattr(tools, "sample_ids", ScriptedPolicy(tok, {"47 plus 85": ["<call> calculator 47 + 85 </call>"]}))
    box = tools.Toolbox.load(["stages.rl.tools:calculator"])
    rollout = tools.sample_with_tools(torch.nn.Linear(1, 1), tok, ["what is 47 plus 85"], box, max_calls=2,
                                      max_new_tokens=8)  # fmt: skip
    assert _texts(tok, rollout) == ["<call> calculator 47 + 85 </call> <result> 132"]
    assert rollout.tool_mask[0].tolist() == [0] * 6 + [1, 1] and not rollout.finished.any()


def test_the_calculator_task_scores_the_answer_after_the_last_result():
    p = "what is 47 plus 85"
    assert calculator.exact_match(p, "<call> calculator 47 + 85 </call> <result> 132 </result> the answer is 132")
    assert not calculator.exact_match(p, "<call> calculator 47 + 85 </call> <result> 132 </result>")  # unanswered
    assert calculator.exact_match(p, "the answer is 132") and not calculator.exact_match(p, "the answer is 131")
    train, held = calculator.split(0)
    assert not set(train) & set(held) and len(train) + len(held) == 4 * 90 * 90
    demos = calculator.make_demonstrations(400, 0, train)
    share = sum(d.uses_tool for d in demos) / len(demos)
    assert 0.4 < share < 0.6 and all(d.correct for d in demos if d.uses_tool)
    rows = [normalise_record({"messages": d.messages, "tools": [calculator.SCHEMA]}, "messages", "demonstrations")
            for d in demos]  # fmt: skip
    assert all(set(calculator.vocabulary()) >= set(_words(r["messages"])) for r in rows)


def _words(messages: list[dict]) -> list[str]:
    context, rest = tool_calls.split_conversation(messages)
    return " ".join([m["content"] for m in context] + [t for t, _ in tool_calls.tagged_segments(rest)]).split()


# A chat template with its own tool format, as Qwen2.5's and Hermes' render it (ChatML turns, calls as
# `<tool_call>` JSON, results as a user turn of `<tool_response>`s).
HERMES_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message.role in ['user', 'system'] %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{% elif message.role == 'assistant' %}<|im_start|>assistant\n{{ message.content or '' }}"
    "{% for call in message.tool_calls or [] %}{% set f = call.function if call.function is defined else call %}"
    '<tool_call>\n{"name": "{{ f.name }}", "arguments": {{ f.arguments | tojson }}}\n</tool_call>'
    "{% endfor %}<|im_end|>\n"
    "{% elif message.role == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}"
    "{{ '\\n' }}<tool_response>\n{{ message.content }}\n</tool_response>"  # a newline right after a tag is trimmed
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>\n{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _hermes_tokenizer():
    from transformers import GPT2TokenizerFast

    from tests.conftest import SHARED, need_shared

    tok = GPT2TokenizerFast.from_pretrained(str(need_shared(SHARED / "tokenizers" / "gpt2")))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.add_tokens(["<tool_call>", "</tool_call>"])
    tok.eos_token, tok.pad_token, tok.chat_template = "<|im_end|>", "<|im_end|>", HERMES_TEMPLATE
    return tok


def test_a_template_with_a_tool_format_trains_and_samples_in_it(monkeypatch):
    """Hermes/Qwen-style templates: SFT's prompt and response are the template's rendering of the whole
    conversation, the tool turn untrained; a rollout appends the template's tool turn after a call."""
    from stages.data.tokens import prompt_ids
    from stages.sft import encode_demonstration

    tok = _hermes_tokenizer()
    fmt = tool_calls.tool_format(tok)
    assert isinstance(fmt, tool_calls.Hermes) and tool_calls.ensure_tool_tags(tok) == []
    msgs = normalise_record(TOOL_ROW, "messages", "demonstrations")["messages"]
    prompt, response, trained = encode_demonstration(tok, msgs)
    whole = tok.apply_chat_template([tool_calls._openai(m) for m in msgs], tokenize=False)
    assert tok.decode(prompt + response) == whole.removesuffix("\n")  # the template's text, its last newline aside
    untrained = tok.decode([t for t, w in zip(response, trained) if not w])
    assert untrained == "\n<|im_start|>user\n<tool_response>\n132\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode([t for t, w in zip(response, trained) if w]).startswith('<tool_call>\n{"name": "calculator"')

    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "47 + 85"}}\n</tool_call><|im_end|>'
    bad = "<tool_call>\nnot json\n</tool_call><|im_end|>"
    policy = ScriptedPolicy(
        tok, {"47 plus 85": [call, "the answer is 132<|im_end|>"], "11 and 11": [bad, "no<|im_end|>"]}
    )
    monkeypatch.setattr(tools, "sample_ids", policy)
    box = tools.Toolbox.load(["stages.rl.tools:calculator"])
    prompts = ["what is 47 plus 85", "add 11 and 11"]
    rollout = tools.sample_with_tools(torch.nn.Linear(1, 1), tok, prompts, box, max_calls=2, max_new_tokens=96)
    ids = rollout.response[0][rollout.response_mask[0].bool()].tolist()
    assert tok.decode(prompt_ids(tok, prompts[0]) + ids) == whole.removesuffix("\n")  # what SFT trained on
    assert tok.decode([t for t, w in zip(ids, rollout.tool_mask[0].tolist()) if w]) == untrained
    assert rollout.finished.tolist() == [True, True] and tools.tool_use(rollout, tok)[1].tolist() == [1, 1]
    errors = rollout.response[1][rollout.tool_mask[1].bool()].tolist()
    assert "error: <tool_call> holds no JSON object with a name" in tok.decode(errors) and box.errors == 1
