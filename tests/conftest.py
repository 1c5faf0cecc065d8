import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flows  # noqa: E402,F401  (project-local Prefect home, telemetry off)

SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def tiny_prepare(tmp_path_factory):
    """A prepared embedded task with small sizes: data, tokenizer and a briefly pretrained tiny Llama."""
    from stages import prepare
    from stages.modeling import ModelConfig

    out = tmp_path_factory.mktemp("prepare")
    data = prepare.DataConfig(
        n_demonstrations=600,
        n_comparison_prompts=120,
        n_heldout_comparison_prompts=40,
        n_ppo_prompts=128,
        n_eval_prompts=64,
    )
    model = ModelConfig(hidden_size=32, intermediate_size=64, pretrain_documents=600, pretrain_epochs=2)
    return prepare.run(data, model, out_dir=out)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("CUDA_VISIBLE_DEVICES") is None:
        import torch

        if not torch.cuda.is_available():
            for item in items:
                if "gpu" in item.keywords:
                    item.add_marker(pytest.mark.skip(reason="needs CUDA; none on this machine"))
