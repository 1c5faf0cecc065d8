"""On pairwise data (K = 2) our ranking loss equals TRL RewardTrainer's loss on the same model and batch."""

import pytest
import torch

from stages.models.modeling import load_scalar_model, load_tokenizer, render_prompts
from stages.preference.losses import ranking_loss
from stages.preference.rankings import ranking_pairs
from stages.preference.scorers import score_rows


def test_k2_loss_matches_trl_reward_trainer(tiny_prepare, tmp_path):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    base = tiny_prepare.file("base")
    tok = load_tokenizer(base)
    torch.manual_seed(0)
    model = load_scalar_model(base).eval()
    model.config.pad_token_id = tok.pad_token_id
    rows = [
        {"prompt": "write about the garden", "responses": ["lovely rose", "sad old fish and bus"]},
        {"prompt": "describe the ocean", "responses": ["great wave boat", "awful"]},
        {"prompt": "tell me about the space", "responses": ["the moon is nice and the star", "bad"]},
    ]
    for r in rows:
        r.update(finished=[True, True], ranks=[0, 1])
    with torch.no_grad():
        ours = ranking_loss(score_rows(model, tok, rows), [ranking_pairs(r["ranks"]) for r in rows]).item()

    def ids(prompt, response):
        query = tok(render_prompts(tok, [prompt])[0], add_special_tokens=False)["input_ids"]
        return query + tok(" " + response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    data = Dataset.from_list(
        [
            {"chosen_ids": ids(r["prompt"], r["responses"][0]), "rejected_ids": ids(r["prompt"], r["responses"][1])}
            for r in rows
        ]
    )
    args = RewardConfig(
        output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to="none", per_device_train_batch_size=len(rows)
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    batch = trainer.data_collator([data[i] for i in range(len(rows))])
    with torch.no_grad():
        theirs = trainer.compute_loss(model, batch).item()
    assert ours == pytest.approx(theirs, abs=1e-5)
    assert ours != pytest.approx(0.6931, abs=1e-3)  # not the trivial log 2 of an untrained head
