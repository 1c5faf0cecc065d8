"""One tokenization everywhere (`stages/data/tokens.py`), on real tokenizers: GPT-2's byte-level BPE, a
SentencePiece model and the embedded word-level one. The ids a response is trained on (SFT, RM,
DPO) are the ids it is sampled as and scored as (PPO, evaluate)."""

import shutil

import pytest
import torch
from conftest import need_shared

from stages.data.tokens import (
    Budget,
    LengthError,
    adds_bos,
    ensure_chat_template,
    fit_rows,
    length_buckets,
    pack,
    prompt_ids,
    response_ids,
)
from stages.models.modeling import Rollout, decode_responses, encode_queries, encode_rollout
from stages.preference.rankings import encode_rankings
from stages.sft import encode_demonstrations
from tests.conftest import SHARED

RESPONSES = ["Once upon a time there was a cat.", "Sure, here are 3 ideas: bake, paint, read!", "no"]
PROMPTS = ["Tell me a story.", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]]


def _gpt2():
    from transformers import GPT2TokenizerFast

    path = SHARED / "tokenizers" / "gpt2"
    need_shared(path)
    tok = GPT2TokenizerFast.from_pretrained(str(path))
    tok.pad_token = tok.eos_token
    return tok


def _sentencepiece(tmp_path):
    from transformers import LlamaTokenizer

    model = SHARED / "tokenizers" / "tok512-sentencepiece" / "tok512.model"
    need_shared(model)
    shutil.copy(model, tmp_path / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(str(tmp_path))
    tok.pad_token = tok.eos_token
    return tok


def _word_level():
    from stages.prepare import build_tokenizer

    return build_tokenizer(["Once upon a time there was a cat. Sure, here are 3 ideas: bake, paint, read! no"])


@pytest.fixture(params=["gpt2", "sentencepiece", "word_level"])
def tokenizer(request, tmp_path):
    tok = {"gpt2": _gpt2, "sentencepiece": lambda: _sentencepiece(tmp_path), "word_level": _word_level}[request.param]()
    ensure_chat_template(tok)
    return tok


def _as_sampled(tok, prompts, responses):
    """The layout `sample` returns for these response ids (EOS ended, right-padded)."""
    return encode_rollout(tok, prompts, responses, [True] * len(responses))


def test_a_response_round_trips_through_sampling_and_scoring(tokenizer):
    """decode(ids) -> encode gives the ids back, so an RM trained on the text scores the sampled ids."""
    ids = [response_ids(tokenizer, r) for r in RESPONSES]
    rollout = _as_sampled(tokenizer, [PROMPTS[0]] * len(RESPONSES), RESPONSES)
    texts = decode_responses(tokenizer, rollout)
    assert [response_ids(tokenizer, t) for t in texts] == ids
    for row, r in zip(rollout.response.tolist(), ids):
        assert row[: len(r)] == r  # the sampled layout holds exactly these ids
    # a response never carries a joining space of its own (SentencePiece's standalone "▁")
    assert all(tokenizer.convert_ids_to_tokens(r[0]) not in ("▁", "Ġ", " ") for r in ids)


def test_every_stage_sees_the_same_prompt_and_response_ids(tokenizer):
    """SFT, the reward model (and DPO, which reads its encoding) and PPO/evaluate sampling agree."""
    demo = [{"messages": [{"role": "user", "content": PROMPTS[0]}, {"role": "assistant", "content": RESPONSES[0]}]}]
    ((sft_prompt, [sft_response]),) = encode_demonstrations(tokenizer, demo)
    ranking = [{"prompt": PROMPTS[0], "responses": RESPONSES[:2], "finished": [True, False], "ranks": [0, 1]}]
    ((rm_prompt, rm_responses),) = encode_rankings(tokenizer, ranking)
    query, mask, _ = encode_queries(tokenizer, [PROMPTS[0]])
    sampled_prompt = query[0][mask[0].bool()].tolist()
    assert sft_prompt == rm_prompt == sampled_prompt == prompt_ids(tokenizer, PROMPTS[0])
    assert sft_response == rm_responses[0] == response_ids(tokenizer, RESPONSES[0], True)
    assert sft_response[-1] == tokenizer.eos_token_id and rm_responses[1][-1] != tokenizer.eos_token_id


def test_a_missing_template_gets_markers_the_vocabulary_has():
    tok = _gpt2()
    assert tok.chat_template is None
    assert ensure_chat_template(tok) == ["<|user|>", "<|assistant|>"]
    for marker in ("<|user|>", "<|assistant|>"):
        assert len(tok(marker, add_special_tokens=False)["input_ids"]) == 1  # one token, never pieces
    ids = prompt_ids(tok, "Hi")
    assert tok.convert_ids_to_tokens(ids[-1]) == "<|assistant|>"
    assert ensure_chat_template(tok) == []  # already has one: left alone


def test_a_model_template_is_used_the_same_way_everywhere():
    """A ChatML-style template (Qwen's markers) instead of the default: every stage renders with it."""
    tok = _gpt2()
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    assert ensure_chat_template(tok) == []
    rendered = tok.decode(prompt_ids(tok, PROMPTS[1]))
    assert (
        rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>assistant\n"
    )
    demo = [{"messages": [PROMPTS[1][0], {"role": "assistant", "content": "Bye"}]}]
    ((sft_prompt, _),) = encode_demonstrations(tok, demo)
    query, mask, _ = encode_queries(tok, [[PROMPTS[1][0]]])
    assert sft_prompt == query[0][mask[0].bool()].tolist() == prompt_ids(tok, [PROMPTS[1][0]])
    assert "<|user|>" not in tok.decode(sft_prompt)


def test_bos_is_added_once_and_only_where_the_tokenizer_adds_it(tmp_path):
    gpt2 = _gpt2()
    ensure_chat_template(gpt2)
    assert not adds_bos(gpt2) and prompt_ids(gpt2, "Hi")[0] != gpt2.bos_token_id  # GPT-2 adds none
    sp = _sentencepiece(tmp_path)
    sp.add_bos_token = True  # Llama's default: BOS in front of every sequence
    sp.update_post_processor() if hasattr(sp, "update_post_processor") else None
    ensure_chat_template(sp)
    if not adds_bos(sp):
        pytest.skip("this transformers' LlamaTokenizer ignores add_bos_token")
    ids = prompt_ids(sp, "Hi")
    assert ids[0] == sp.bos_token_id and ids[1] != sp.bos_token_id
    sp.chat_template = "{{ bos_token }}" + sp.chat_template  # a template that writes BOS itself
    assert prompt_ids(sp, "Hi").count(sp.bos_token_id) == 1


def test_budget_keeps_the_end_of_the_prompt_and_the_start_of_the_response():
    b = Budget(max_prompt_length=3, max_length=5)
    assert b.fit([1, 2, 3, 4], [5, 6, 7]) == ([2, 3, 4], [5, 6], True)
    assert b.fit([1], [5, 6]) == ([1], [5, 6], False)
    assert b.fits([1, 2, 3], [4, 5]) and not b.fits([1, 2, 3], [4, 5, 6])


def test_fit_rows_counts_truncated_and_drops_unlearnable_rankings():
    b = Budget(max_prompt_length=2, max_length=4)
    rows = [([1], [[2]]), ([1, 2, 3], [[4, 5, 6]]), ([1, 2], [[7, 8, 9], [7, 8, 0]])]
    fitted = fit_rows(rows, b, stage="reward_model", max_dropped_fraction=0.5)
    assert fitted.kept == [0, 1] and fitted.truncated == 1 and fitted.dropped == 1  # row 3: identical once cut
    assert fitted.rows[1] == ([2, 3], [[4, 5]])
    with pytest.raises(LengthError, match=r"pairs.jsonl:3: its responses are identical.*stage.reward_model.max_length"):
        fit_rows(rows, b, stage="reward_model", sources=["pairs.jsonl:1", "pairs.jsonl:2", "pairs.jsonl:3"])


def test_without_truncation_a_long_prompt_is_an_error_naming_line_and_key():
    b = Budget(max_prompt_length=2, max_length=4)
    with pytest.raises(
        LengthError, match=r"d.jsonl:7: longer than.*stage.sft.max_prompt_length=2.*data.truncation=true"
    ):
        fit_rows([([1, 2, 3], [[4]])], b, stage="sft", truncation=False, sources=["d.jsonl:7"])
    kept = fit_rows([([1, 2, 3], [[4]]), ([1], [[4]])], b, stage="sft", truncation=False, max_dropped_fraction=0.5)
    assert kept.kept == [1] and kept.dropped == 1


def test_rows_are_padded_jointly():
    packed = pack([([1, 2], [3]), ([4], [5, 6, 7])], pad_id=0)
    assert packed.ids.tolist() == [[1, 2, 3, 0], [4, 5, 6, 7]]
    assert packed.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert packed.response_mask.tolist() == [[0, 0, 1, 0], [0, 1, 1, 1]]


def test_length_buckets_cover_every_row_once_in_similar_lengths():
    lengths = [5, 1, 9, 2, 8, 3, 7, 4]
    batches = length_buckets(lengths, 2, torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert sorted(sorted(lengths[i] for i in b) for b in batches) == [[1, 2], [3, 4], [5, 7], [8, 9]]


def test_sampled_layout_decodes_without_eos(tokenizer):
    ids = response_ids(tokenizer, "no", True)
    rollout = Rollout(
        torch.tensor([[tokenizer.pad_token_id]]),
        torch.tensor([[1]]),
        torch.tensor([ids + [tokenizer.pad_token_id]]),
        torch.tensor([[1] * len(ids) + [0]]),
        torch.tensor([True]),
    )
    assert decode_responses(tokenizer, rollout) == ["no"]
