"""Each stage's run() on a tiny model built locally from a config, chained as the flow chains them."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import embedded_tuning, need_shared
from safetensors.torch import load_file

from stages import comparisons, evaluate, ppo, reward_model, sft
from stages.models.modeling import load_causal_lm, load_tokenizer
from stages.runtime.manifest import folder_digest, read_jsonl
from stages.settings.labeling import LabelerConfig
from stages.settings.models import PeftConfig, Tuning


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _prompts(chain) -> Path:
    return Path(chain["prompts"])


@pytest.fixture(scope="module")
def chain(tiny_prepare, tmp_path_factory):
    p = tiny_prepare
    out = {"prompts": str(p.file("ppo_prompts"))}
    out["sft"] = sft.run(
        sft.SftConfig(epochs=2, batch_size=32, **embedded_tuning("sft")),
        Tuning(PeftConfig(r=8, alpha=16)),
        base=p.file("base"),
        demonstrations=p.file("demonstrations"),
        out_dir=tmp_path_factory.mktemp("sft"),
    )
    out["cmp"] = comparisons.run(
        comparisons.ComparisonsConfig(k=4),
        LabelerConfig(),
        policy=out["sft"].file("policy"),
        prompts=p.file("comparison_prompts"),
        heldout_prompts=p.file("heldout_comparison_prompts"),
        target_len=6,
        out_dir=tmp_path_factory.mktemp("cmp"),
    )
    out["rm"] = reward_model.run(
        reward_model.RewardModelConfig(epochs=3, learning_rate=1e-3, pooling="mean"),
        policy=out["sft"].file("policy"),
        comparisons=out["cmp"].file("comparisons"),
        heldout=out["cmp"].file("heldout_comparisons"),
        out_dir=tmp_path_factory.mktemp("rm"),
    )
    out["ppo"] = ppo.run(
        ppo.PpoConfig(updates=3, rollouts_per_update=32, minibatch_size=16, **embedded_tuning("ppo")),
        Tuning(PeftConfig("full")),
        policy=out["sft"].file("policy"),
        reward_model=out["rm"].file("model"),
        normalization=out["rm"].file("normalization"),
        prompts=p.file("ppo_prompts"),
        out_dir=tmp_path_factory.mktemp("ppo"),
    )
    out["eval"] = evaluate.run(
        evaluate.EvaluateConfig(),
        sft_policy=out["sft"].file("policy"),
        policy=out["ppo"].file("policy"),
        reward_model=out["rm"].file("model"),
        normalization=out["rm"].file("normalization"),
        heldout_comparisons=out["cmp"].file("heldout_comparisons"),
        prompts=p.file("eval_prompts"),
        target_len=6,
        out_dir=tmp_path_factory.mktemp("ev"),
    )
    return out


def test_prepare_round_trips_through_from_pretrained(tiny_prepare):
    base = tiny_prepare.file("base")
    assert (base / "model.safetensors").exists() and not list(base.glob("*.bin"))
    model, tok = load_causal_lm(base), load_tokenizer(base)
    assert model.config.model_type == "llama"
    assert tok.chat_template and tok.eos_token == "<eos>"
    assert len(read_jsonl(tiny_prepare.file("demonstrations"))) == 600
    assert tiny_prepare.digest == folder_digest(tiny_prepare.path)


def test_sft_trains_and_ships_template_and_eos(tiny_prepare, chain):
    m = chain["sft"]
    assert m.metrics["sft/train/loss_last"] < m.metrics["sft/train/loss_first"]
    before, after = _weights(tiny_prepare.file("base")), _weights(m.file("policy"))
    assert set(before) == set(after)  # LoRA merged back into a plain model
    assert any(not torch.equal(before[k], after[k]) for k in before)
    tok = load_tokenizer(m.file("policy"))
    assert tok.chat_template == load_tokenizer(tiny_prepare.file("base")).chat_template
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tokenize=False
    )
    assert "<eos>" in rendered


def test_comparisons_rank_k_responses(chain):
    rows = read_jsonl(chain["cmp"].file("comparisons"))
    assert len(rows) == 120
    for row in rows:
        assert len(row["responses"]) == 4 and len(row["ranks"]) == 4 and min(row["ranks"]) == 0


def test_reward_model_learns_the_rankings(chain):
    m = chain["rm"]
    assert m.metrics["rm/train/accuracy"] > 0.6
    normalization = json.loads(m.file("normalization").read_text())
    assert normalization == {
        "bias": pytest.approx(m.metrics["rm/bias"]),
        "pooling": "mean",
        "max_prompt_length": 48,  # the limits it was trained with, sized from the 64-token context
        "max_length": 64,
    }


def test_ppo_updates_the_policy(chain):
    m = chain["ppo"]
    before, after = _weights(chain["sft"].file("policy")), _weights(m.file("policy"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(math.isfinite(v) for v in m.metrics.values())  # no NaN, no inf
    assert len(read_jsonl(m.file("samples"))) == 32


def test_evaluate_reports_every_figure(chain):
    e = json.loads(chain["eval"].file("eval").read_text())
    assert set(e) >= {"gold_sft", "gold_policy", "win_rate", "kl_to_sft", "rm_accuracy", "labeler_ceiling"}
    assert 0.0 <= e["win_rate"] <= 1.0 and 0.5 < e["labeler_ceiling"] <= 1.0
    assert e["kl_to_sft"] > 0  # the policy moved


def test_sft_on_real_demonstrations_through_the_data_worker(tmp_path):
    from stages import prepare
    from stages.settings.data import DatasetConfig
    from stages.settings.models import ModelConfig

    alpaca = Path(__file__).resolve().parents[2] / "shared/data/llamafactory-demo/alpaca_en_demo.json"
    need_shared(alpaca)
    data = prepare.DataConfig(
        n_comparison_prompts=8,
        n_heldout_comparison_prompts=8,
        n_ppo_prompts=8,
        n_eval_prompts=8,
        demonstrations=DatasetConfig(path=str(alpaca), kind="demonstrations"),
    )
    prep = prepare.run(
        data,
        ModelConfig(hidden_size=32, intermediate_size=64, pretrain_documents=100, pretrain_epochs=1),
        out_dir=tmp_path / "prep",
    )
    # 10% of the 999 held out: the PPO and evaluation prompts come from the data, never the generator
    assert prep.metrics["prepare/demonstrations/rows"] == 899 and prep.metrics["prepare/data/bad_rows"] == 0
    rows = read_jsonl(prep.file("demonstrations"))
    trained = {json.dumps(r["messages"][:-1]) for r in rows}
    evaluated = [r["prompt"] for r in read_jsonl(prep.file("eval_prompts"))]
    assert evaluated and not trained & {json.dumps(p) for p in evaluated}
    described = json.loads(prep.file("sources").read_text())
    assert described["gold"] is None and "held-out split" in described["prompt_source"]["eval_prompts"]
    m = sft.run(
        sft.SftConfig(epochs=1, max_length=48, **embedded_tuning("sft")),
        Tuning(PeftConfig(method="full")),
        base=prep.file("base"),
        demonstrations=prep.file("demonstrations"),
        out_dir=tmp_path / "sft",
    )
    assert m.metrics["sft/train/loss_last"] < m.metrics["sft/train/loss_first"]


def test_ppo_shared_base_layout_trains_adapters_and_exports_a_plain_model(chain, tmp_path):
    m = ppo.run(
        ppo.PpoConfig(updates=2, rollouts_per_update=16, minibatch_size=8, layout="shared_base"),
        Tuning(PeftConfig(r=4, alpha=8)),
        policy=chain["sft"].file("policy"),
        reward_model=chain["rm"].file("model"),
        normalization=chain["rm"].file("normalization"),
        prompts=_prompts(chain),
        out_dir=tmp_path,
    )
    before, after = _weights(chain["sft"].file("policy")), _weights(m.file("policy"))
    assert set(before) == set(after)  # adapters merged: a plain model folder, no LoRA keys
    assert any(not torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match=r"shared_base: .*peft=lora, dora, loraplus, qlora\), not full"):
        ppo.run(
            ppo.PpoConfig(layout="shared_base"),
            Tuning(PeftConfig(method="full")),
            policy=chain["sft"].file("policy"),
            reward_model=chain["rm"].file("model"),
            normalization=chain["rm"].file("normalization"),
            prompts=_prompts(chain),
            out_dir=tmp_path / "x",
        )


@pytest.mark.parametrize(
    "estimator, layout, kl_penalty",
    [
        ("grpo", "full_copies", "loss"),
        ("rloo", "full_copies", "reward"),
        ("dr_grpo", "shared_base", "loss"),
        ("reinforce_pp", "full_copies", "reward"),
        ("reinforce_pp_baseline", "shared_base", "reward"),
    ],
)
def test_critic_free_estimators_train_the_policy_and_load_no_value_model(
    chain, tmp_path, monkeypatch, estimator, layout, kl_penalty
):
    from stages.rl import ppo_models

    built = []
    for cls in (ppo_models.FullCopies, ppo_models.SharedBase):

        def spy(self, policy, critic_init, *a, _original=cls.__init__, **kw):
            built.append(critic_init)
            _original(self, policy, critic_init, *a, **kw)

        monkeypatch.setattr(cls, "__init__", spy)
    n = 1 if estimator == "reinforce_pp" else 4
    m = ppo.run(
        ppo.PpoConfig(
            updates=2,
            rollouts_per_update=16,
            minibatch_size=8,
            layout=layout,
            advantage=estimator,
            samples_per_prompt=n,
            kl_penalty=kl_penalty,
        ),
        Tuning(PeftConfig(r=4, alpha=8) if layout == "shared_base" else PeftConfig("full")),
        policy=chain["sft"].file("policy"),
        reward_model=chain["rm"].file("model"),
        normalization=chain["rm"].file("normalization"),
        prompts=_prompts(chain),
        out_dir=tmp_path,
    )
    assert built == [None]  # the models were built without a value model to initialise
    assert m.metrics["ppo/value_model"] == 0.0 and m.metrics["ppo/samples_per_prompt"] == n
    before, after = _weights(chain["sft"].file("policy")), _weights(m.file("policy"))
    assert set(before) == set(after)  # a plain model folder, whatever the layout
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_estimator_config_is_checked():
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        ppo.PpoConfig(advantage="grpo")
    with pytest.raises(ValueError, match="stage.ppo.advantage"):
        ppo.PpoConfig(advantage="a2c")
    with pytest.raises(ValueError, match="divide"):
        ppo.PpoConfig(advantage="rloo", samples_per_prompt=3, rollouts_per_update=64)
    with pytest.raises(ValueError, match="kl_penalty=loss"):
        ppo.PpoConfig(kl_penalty="loss")
