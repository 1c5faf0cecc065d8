"""trl 1.12.0's experimental PPOTrainer on our SFT policy and reward model (benchmark-only env).

Runs in `.bench-venvs/trl112` (trl==1.12.0, never a project dependency), started by
`bench/ppo_vs_trl.py` with matched settings passed as JSON; prints wall time and peak RSS.
"""

import json
import resource
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from trl.experimental.ppo import PPOConfig, PPOTrainer


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.manual_seed(spec["seed"])
    tok = AutoTokenizer.from_pretrained(spec["policy"])
    policy = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32)
    rm = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], num_labels=1, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], num_labels=1, dtype=torch.float32)
    prompts = [json.loads(line)["prompt"] for line in Path(spec["prompts"]).read_text().splitlines() if line]
    rendered = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    data = Dataset.from_dict({"input_ids": [tok(r, add_special_tokens=False)["input_ids"] for r in rendered]})
    args = PPOConfig(
        output_dir=spec["out"],
        bf16=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        seed=spec["seed"],
        total_episodes=spec["episodes"],
        per_device_train_batch_size=spec["minibatch"],
        gradient_accumulation_steps=1,
        num_mini_batches=spec["batch"] // spec["minibatch"],
        num_ppo_epochs=spec["ppo_epochs"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        kl_coef=spec["beta"],
        kl_estimator="k1",
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.1,
        gamma=1.0,
        lam=0.95,
        response_length=spec["max_new_tokens"],
        temperature=1.0,
        stop_token="eos",
        num_sample_generations=0,
        local_rollout_forward_batch_size=spec["batch"],
        dataloader_num_workers=0,
        gradient_checkpointing=False,
        logging_steps=10,
    )
    trainer = PPOTrainer(
        args=args,
        processing_class=tok,
        model=policy,
        ref_model=ref,
        reward_model=rm,
        train_dataset=data,
        value_model=value,
        eval_dataset=data.select(range(8)),
    )
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    policy.save_pretrained(Path(spec["out"]) / "policy", safe_serialization=True)
    tok.save_pretrained(Path(spec["out"]) / "policy")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"seconds": seconds, "peak_rss_mb": peak}))


if __name__ == "__main__":
    main()
