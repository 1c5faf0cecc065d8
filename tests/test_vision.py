"""Vision-language models: image-text rows through the data worker, the processor and every forward
pass, on a tiny LLaVA saved with `save_pretrained` and GPT-2's real tokenizer; the embedded visual
task's gold rule; the visual variant through the flow."""

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import SHARED, need_shared

from stages.data import images, shapes
from stages.data.reader import DataError, load
from stages.data.tokens import ensure_chat_template, pack, prompt_ids, response_ids
from stages.models import vision
from stages.models.modeling import (
    build_tiny_llava,
    encode_rollout,
    load_causal_lm,
    load_scalar_model,
    load_tokenizer,
    response_logprobs,
    sample,
    save_tokenizer,
    sequence_logprobs,
    sequence_scores,
)
from stages.settings.data import DatasetConfig
from stages.settings.models import ModelConfig


@pytest.fixture(scope="module")
def vlm_folder(tmp_path_factory):
    """A tiny LLaVA with GPT-2's tokenizer (no chat template, no pad, as downloaded) and its processor."""
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(str(need_shared(SHARED / "tokenizers" / "gpt2")))
    tok.pad_token = tok.eos_token
    ensure_chat_template(tok)
    tok.processor = vision.build_processor(tok)
    model = build_tiny_llava(ModelConfig(hidden_size=32, intermediate_size=64), tok, seed=0)
    folder = tmp_path_factory.mktemp("vlm")
    model.save_pretrained(folder)
    save_tokenizer(tok, folder)
    return folder


def picture(colour: str, shape: str = "square", seed: int = 0) -> str:
    return images.to_png_uri(shapes.draw(random.Random(seed), colour, shape))


def ask(uri: str, text: str = "what colour is the shape") -> list[dict]:
    return [{"role": "user", "content": f"{images.IMAGE_TOKEN} {text}", "images": [uri]}]


def test_gold_rule_reads_the_colour_back_from_the_pixels():
    for seed in range(20):
        for colour in shapes.COLOURS:
            for shape in shapes.SHAPES:
                image = shapes.draw(random.Random(seed), colour, shape)
                assert shapes.colour_in(image) == colour, (seed, colour, shape)
    prompt = ask(picture("blue"))
    assert shapes.exact_match(prompt, "it is blue") == 1.0
    assert shapes.exact_match(prompt, "it is red") == 0.0
    assert shapes.exact_match(prompt, "red no it is blue") == 1.0  # the last colour word counts
    assert shapes.exact_match(prompt, "") == 0.0


def test_prompt_ids_expand_the_image_and_carry_its_pixels(vlm_folder):
    tok = load_tokenizer(vlm_folder)
    assert tok.processor is not None
    ids = prompt_ids(tok, ask(picture("red")))
    image_id = tok.processor.image_token_id
    assert isinstance(ids, images.VisionIds) and ids.count(image_id) == 4  # (16 / 8)^2 patches, CLS dropped
    assert ids.vision["pixel_values"].shape == (1, 3, 16, 16)
    joined = ids + [1, 2]
    assert joined.vision is ids.vision and joined[-2:] == [1, 2]
    assert [7] + ids == [7, *ids] and ([7] + ids).vision is ids.vision
    first = list(ids).index(image_id)
    assert ids[first:].vision is ids.vision  # a cut that keeps every image token keeps the images
    with pytest.raises(images.ImageError, match="max_prompt_length"):
        ids[first + 1 :]  # a cut inside the image tokens
    text_only = prompt_ids(tok, "what colour is the shape")
    assert not isinstance(text_only, images.VisionIds)


def test_the_image_reaches_every_forward_pass(vlm_folder):
    tok = load_tokenizer(vlm_folder)
    policy = load_causal_lm(vlm_folder).eval()
    scorer = load_scalar_model(vlm_folder).eval()
    assert type(scorer).__name__ == "LlavaForSequenceClassification"
    same = (
        "model.language_model.layers.0.self_attn.q_proj.weight",
        "model.vision_tower.embeddings.patch_embedding.weight",
    )
    for name in same:  # the scalar model starts from the policy's own backbone
        assert torch.equal(scorer.state_dict()[name], policy.state_dict()[name])
    red, blue = ask(picture("red")), ask(picture("blue"))
    longer = ask(picture("red"), "what colour is the shape in this small picture please")
    with torch.no_grad():
        batch = encode_rollout(tok, [red, blue, longer], ["it is red"] * 3, [True] * 3)
        logp, _ = response_logprobs(policy, batch)
        alone = encode_rollout(tok, [red], ["it is red"], [True])
        logp_alone, _ = response_logprobs(policy, alone)
        n = alone.response.shape[1]
        # left padding beside a longer prompt changes nothing; another picture changes the log-probs
        torch.testing.assert_close(logp[0, :n], logp_alone[0], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(logp[0], logp[1])
        scores = sequence_scores(scorer, batch)
        torch.testing.assert_close(scores[:1], sequence_scores(scorer, alone), atol=1e-5, rtol=1e-5)
        assert scores[0] != scores[1]
        rows = [(prompt_ids(tok, p), response_ids(tok, "it is red")) for p in (red, blue)]
        packed = pack(rows, tok.pad_token_id)
        assert len(packed.vision) == 2
        summed = sequence_logprobs(policy, packed)
        torch.testing.assert_close(summed, (logp[:2] * batch.response_mask[:2]).sum(1), atol=1e-4, rtol=1e-4)
    rollout = sample(policy, tok, [red, blue] * 4, max_new_tokens=6, generator_seed=0)
    assert len(rollout.vision) == 8
    assert not (rollout.response == tok.processor.image_token_id).any()  # never sampled
    assert len(rollout.select([1, 3]).vision) == 2


def _png(path, colour="red"):
    shapes.draw(random.Random(0), colour, "circle").save(path)
    return path.name


def test_image_rows_through_the_data_worker(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png", "blue")
    rows = [
        {"conversations": [{"from": "human", "value": "<image>what is it"}, {"from": "gpt", "value": "red"}],
         "images": ["a.png"]},
        {"instruction": "compare", "input": "", "output": "two", "images": ["a.png", "b.png"]},
    ]  # fmt: skip
    path = tmp_path / "demos.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n")
    got = load(DatasetConfig(path=str(path))).rows[0]["messages"]
    assert got[0]["images"][0].startswith("data:image/png;base64,") and "images" not in got[1]
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{**rows[1], "instruction": "<image> and <image>: compare"}]))
    turn = load(DatasetConfig(path=str(alpaca))).rows[0]["messages"][0]
    assert len(turn["images"]) == 2
    single = tmp_path / "single.json"  # one image and no placeholder: it goes before the text
    single.write_text(json.dumps([{**rows[1], "images": ["b.png"]}]))
    turn = load(DatasetConfig(path=str(single))).rows[0]["messages"][0]
    assert turn["content"].startswith(images.IMAGE_TOKEN) and len(turn["images"]) == 1


@pytest.mark.parametrize(
    "image, problem",
    [
        ("corrupt.png", "corrupt.png is not a readable image"),
        ("missing.png", "missing.png does not exist"),
        ("data:image/png;base64,AAAA", "an inline image does not decode"),
    ],
)
def test_a_bad_image_is_refused_naming_file_line_and_image(tmp_path, image, problem):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a PNG header, then nothing
    _png(tmp_path / "good.png")
    good = {"conversations": [{"from": "human", "value": "<image>what"}, {"from": "gpt", "value": "red"}]}
    path = tmp_path / "demos.jsonl"
    path.write_text("\n".join(json.dumps({**good, "images": [im]}) for im in ("good.png", image)) + "\n")
    with pytest.raises(DataError) as err:
        load(DatasetConfig(path=str(path)))
    assert f"{path}:2: images: " in str(err.value) and problem in str(err.value)


def test_placeholders_must_match_the_images(tmp_path):
    _png(tmp_path / "a.png")
    row = {"conversations": [{"from": "human", "value": "<image><image>what"}, {"from": "gpt", "value": "x"}]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({**row, "images": ["a.png"]}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:1: images: 1 images but 2 <image> placeholders"):
        load(DatasetConfig(path=str(path)))


def test_a_text_model_refuses_image_rows(tmp_path):
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(str(need_shared(SHARED / "tokenizers" / "gpt2")))
    ensure_chat_template(tok)
    with pytest.raises(images.ImageError, match="no image processor"):
        prompt_ids(tok, ask(picture("red")))


def _image_data(tmp_path, n: int, seed: int = 0) -> tuple[str, str]:
    """(demonstrations, comparisons): ShareGPT rows with pictures as files beside the data, LLaMA-Factory's
    layout; the comparisons are ShareGPT pairs whose chosen reply names the right colour."""
    rng = random.Random(seed)
    (tmp_path / "pictures").mkdir()
    demos, pairs = [], []
    for i in range(n):
        colour, shape = rng.choice(sorted(shapes.COLOURS)), rng.choice(shapes.SHAPES)
        name = f"pictures/{i}.png"
        shapes.draw(rng, colour, shape).save(tmp_path / name)
        wrong = rng.choice([c for c in shapes.COLOURS if c != colour])
        turn = [{"from": "human", "value": "<image>what colour is the shape"}]
        demos.append({"conversations": [*turn, {"from": "gpt", "value": f"it is {colour}"}], "images": [name]})
        pairs.append({
            "conversations": turn, "images": [name],
            "chosen": {"from": "gpt", "value": f"it is {colour}"},
            "rejected": {"from": "gpt", "value": f"it is {wrong}"},
        })  # fmt: skip
    d, c = tmp_path / "demos.jsonl", tmp_path / "pairs.jsonl"
    d.write_text("".join(json.dumps(r) + "\n" for r in demos))
    c.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return str(d), str(c)


@pytest.mark.slow
def test_the_visual_task_through_the_flow_rlhf_then_dpo(tmp_path):
    from tests.test_flow import TINY, align, statuses

    rlhf = align(tmp_path, "data=embedded_vision", *TINY)
    assert statuses(rlhf) == dict.fromkeys(["prepare", "sft", "comparisons", "reward_model", "ppo", "evaluate"], "ran")
    accuracy = rlhf["eval"]["accuracy"]  # exact match of the colour read from the pixels, with Wilson intervals
    from stages.preference.validity import wilson

    sft, policy = accuracy["sft"], accuracy["policy"]
    assert sft["n"] == policy["n"] > 0  # the same held-out pictures for both
    for block in (sft, policy):  # a whole number of right colours, and its Wilson interval
        right = round(block["accuracy"] * block["n"])
        assert block["accuracy"] * block["n"] == pytest.approx(right)
        assert block["ci95"] == pytest.approx(list(wilson(right, block["n"])))
    assert accuracy["difference"] == pytest.approx(policy["accuracy"] - sft["accuracy"])
    assert rlhf["data"]["gold"] == "vision"
    dpo = align(tmp_path, "data=embedded_vision", *TINY, "pipeline=dpo")
    assert statuses(dpo) == {
        **dict.fromkeys(["prepare", "sft", "comparisons"], "cached"),
        "dpo": "ran",
        "evaluate": "ran",
    }
    generations = Path(dpo["stages"]["evaluate"]["artifact"], "generations.jsonl").read_text().splitlines()
    first = json.loads(generations[0])
    assert images.images_of(first["prompt"])[0].startswith("data:image/png;base64,")  # the artifact holds the image


@pytest.mark.slow
def test_own_vlm_and_image_rows_through_the_dpo_branch(vlm_folder, tmp_path):
    from tests.test_flow import align

    demos, pairs = _image_data(tmp_path, 60)
    data = ["data=files", f"data.demonstrations.path={demos}", f"data.comparisons.path={pairs}"]
    small = ["stage.sft.epochs=1", "stage.sft.batch_size=8", "stage.dpo.batch_size=8", "stage.reward_model.epochs=1",
             "stage.evaluate.max_new_tokens=6", "pipeline.min_rm_accuracy=0"]  # fmt: skip
    summary = align(tmp_path / "artifacts", f"model.name_or_path={vlm_folder}", *data, *small, "pipeline=dpo")
    assert {"prepare", "sft", "dpo", "eval_reward_model", "evaluate"} <= set(summary["stages"])
    assert summary["stages"]["sft"]["metrics"]["sft/rows"] == 60  # every image demonstration reached SFT
    assert summary["eval"]["win"]["by"] == "evaluation reward model"
    # a corrupt picture on line 7 of the comparisons: refused before any compute, file, line and image named
    (tmp_path / "pictures" / "6.png").write_bytes(b"not a png")
    import subprocess
    import sys

    from tests.test_flow import ROOT

    cmd = [sys.executable, "-m", "flows.align", f"artifacts_dir={tmp_path / 'artifacts'}",
           f"model.name_or_path={vlm_folder}", *data, *small, "pipeline=dpo"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert f"{pairs}:7: images: " in out and "pictures/6.png is not a readable image" in out, out[-3000:]
    assert "Traceback" not in out
