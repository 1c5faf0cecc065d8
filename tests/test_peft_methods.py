"""Every CPU-capable fine-tuning method and optimizer, in both kinds of training stage: a causal LM
(SFT, DPO, the PPO policy) and a scalar head (reward model, PPO value). Each trains a few steps through
the door the stages use (`stages/models/tuning.py`); the test asserts the trainable-parameter count the method
implies, computed here by hand from the architecture, and that exactly those parameters changed."""

from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model

from stages.models import tuning as tuning_lib
from stages.settings.models import ComputeConfig, OptimConfig, PeftConfig, Tuning

H, I, LAYERS, R = 32, 64, 2, 4  # build_tiny_model's Llama: hidden, intermediate, layers; the LoRA rank
M = 8  # the Houlsby bottleneck's width
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Reward models rank responses; PPO follows them."]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("methods") / "llama", "llama")


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """Hidden 64: bitsandbytes' CPU 4-bit kernels for inference need input widths in blocks of 64."""
    return build_tiny_model(tmp_path_factory.mktemp("methods") / "wide", "llama", hidden=64, intermediate=128)


def _layer(h: int, i: int) -> int:
    """One Llama decoder layer: q, k, v, o (h x h, two KV heads of h/2), gate, up, down, two RMSNorms."""
    return 4 * h * h + 3 * h * i + 2 * h


def _lora(r: int, h: int, i: int) -> int:
    """LoRA on every linear layer of the decoder (peft's all-linear leaves the LM head out): r*(in+out) each."""
    return LAYERS * (4 * r * (h + h) + 2 * r * (h + i) + r * (i + h))


def expected(method: str, optim: str, kind: str, vocab: int, h: int = H, i: int = I) -> int:
    head = h if kind == "scalar" else 0  # the score head (no bias) trains with every method
    full = vocab * h + LAYERS * _layer(h, i) + h + head  # tied embeddings / LM head, final norm
    if optim == "badam":
        return _layer(h, i) + head  # the first block (ascending) and the always-active head
    lora = _lora(R, h, i) + head
    return {
        "full": full,
        "freeze": _layer(h, i) + head,
        # two bottlenecks per layer (after attention and after the MLP): down h x m + m, up m x h + h
        "houlsby": LAYERS * 2 * (h * M + M + M * h + h) + head,
        "lora": lora,
        "loraplus": lora,
        "pissa": lora,
        "qlora": lora,
        "qlora_torchao": lora,
        "qlora_quanto": lora,
        "qlora_quanto4": lora,
        "dora": lora + LAYERS * (4 * h + 2 * i + h),  # one magnitude per output feature of each adapted linear
    }[method]


CASES = [
    ("full", "adamw"),
    ("freeze", "adamw"),
    ("houlsby", "adamw"),
    ("lora", "adamw"),
    ("dora", "adamw"),
    ("pissa", "adamw"),
    ("loraplus", "adamw"),
    ("qlora", "adamw"),  # on the 64-wide model (bitsandbytes' CPU kernels)
    ("qlora_torchao", "adamw"),  # torchao's int8 weight-only base
    ("qlora_quanto", "adamw"),  # optimum-quanto's int8 weights
    ("qlora_quanto4", "adamw"),  # optimum-quanto's int4 weights
    ("full", "galore"),
    ("full", "badam"),
    ("full", "adamw_8bit"),
]


def _peft(method: str, **kwargs) -> PeftConfig:
    """`qlora_torchao`: QLoRA on torchao's int8 weight-only base; the other names are peft.method's."""
    if method == "qlora_torchao":
        return PeftConfig(method="qlora", quant_method="torchao", quant_bits=8, **kwargs)
    if method.startswith("qlora_quanto"):
        return PeftConfig(method="qlora", quant_method="quanto", quant_bits=4 if method.endswith("4") else 8, **kwargs)
    return PeftConfig(method=method, **kwargs)


def _is_quantised(model, method: str) -> bool:
    """Whether the base's decoder linears really hold quantised weights (bitsandbytes or torchao)."""
    weights = [m.weight for n, m in model.named_modules() if n.endswith("mlp.up_proj.base_layer")]
    names = {type(w).__name__ for w in weights}
    if method.startswith("qlora_quanto"):  # quanto's QLinear packs its weight into a quantised tensor
        return bool(weights) and all("QBytesTensor" in n or "QBitsTensor" in n or "Packed" in n for n in names)
    return bool(weights) and (names <= {"Params4bit"} if method == "qlora" else all("Int8" in n for n in names))


def _loss(model, kind: str, batch) -> torch.Tensor:
    if kind == "causal_lm":
        return model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
    scores = model(**batch).logits.squeeze(-1)
    return -torch.nn.functional.logsigmoid(scores[0] - scores[1])  # row 0 preferred: a pairwise RM loss


def _quantised_tensor(t) -> bool:
    name = type(t).__name__
    return name.startswith("Int8") or "QBytesTensor" in name or "QBitsTensor" in name


def _snapshot(model) -> dict[str, torch.Tensor]:
    """Every parameter's values; a torchao int8 weight as its dequantised values (it has no `equal`)."""
    return {
        n: (p.detach().dequantize() if _quantised_tensor(p.detach()) else p.detach()).clone()
        for n, p in model.named_parameters()
    }


@pytest.mark.parametrize("kind", ["causal_lm", "scalar"])
@pytest.mark.parametrize(("method", "optim"), CASES, ids=[f"{m}-{o}" for m, o in CASES])
def test_each_method_trains_exactly_its_parameters(base, wide, method, optim, kind):
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(base))
    tok.pad_token = tok.eos_token
    batch = dict(tok(TEXTS, return_tensors="pt", padding=True))
    tuning = Tuning(
        _peft(method, r=R, alpha=2 * R, pissa_niter=2, adapter_size=M),
        OptimConfig(name=optim, galore_rank=4, galore_update_proj_gap=2, badam_switch_every=50),
        ComputeConfig(),
    )
    folder, h, i = (wide, 64, 128) if method == "qlora" else (base, H, I)
    model = tuning_lib.load(folder, tuning, kind, adjust=lambda m: setattr(m.config, "pad_token_id", tok.pad_token_id))
    opt = tuning_lib.optimizer(model, tuning, lr=1e-2)
    if method.startswith("qlora"):
        assert _is_quantised(model, method)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}  # after BAdam picked its block
    count = sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert count == expected(method, optim, kind, len(tok), h, i), sorted(trainable)[:6]
    before = _snapshot(model)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        _loss(model, kind, batch).backward()
        opt.step()
    after = _snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == trainable, (sorted(changed - trainable)[:4], sorted(trainable - changed)[:4])


@pytest.mark.parametrize("method", ["lora", "dora", "pissa", "qlora", "qlora_torchao", "qlora_quanto", "qlora_quanto4"])
def test_adapter_outputs_load_with_peft_and_merge_into_a_plain_folder(base, wide, tmp_path, method):
    """The adapter loads with `PeftModel.from_pretrained` on the full-precision base (a QLoRA adapter
    and PiSSA's converted one too) and gives the merged plain folder's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = wide if method == "qlora" else base
    tuning = Tuning(_peft(method, r=R, alpha=2 * R, pissa_niter=2))
    model = tuning_lib.load(base, tuning, "causal_lm")
    opt = tuning_lib.optimizer(model, tuning, lr=1e-2)
    ids = torch.tensor([[5, 17, 99, 3, 42, 7]])
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    tuning_lib.export(model, tuning, tmp_path / "merged", base=base, adapter=tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    full_base = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    adapted = PeftModel.from_pretrained(full_base, str(tmp_path / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    assert not list((tmp_path / "merged").glob("adapter_*"))  # a plain folder
    with torch.no_grad():
        a, m = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
        untouched = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)(input_ids=ids).logits
    assert torch.allclose(a, m, atol=1e-4), (a - m).abs().max()
    assert not torch.allclose(m, untouched, atol=1e-4)  # training moved it
    model.eval()
    with torch.no_grad():  # the trained model itself, sampling-style (a 4-bit base: bitsandbytes' CPU kernel)
        trained = model(input_ids=ids).logits
    tolerance = {"qlora": 0.1, "qlora_torchao": 0.05, "qlora_quanto": 0.05, "qlora_quanto4": 0.2}.get(
        method, 1e-4
    )  # quantised against full precision
    assert torch.allclose(trained, m, atol=tolerance), (trained - m).abs().max()


@pytest.mark.parametrize("method", ["lora", "pissa"])
def test_an_adapter_reward_model_keeps_its_head_trainable_and_its_artifacts_loadable(base, tmp_path, method):
    from stages.models.modeling import load_scalar_model
    from stages.models.peft_setup import load_adapter

    tuning = Tuning(PeftConfig(method=method, r=R, alpha=2 * R, pissa_niter=2))
    model = tuning_lib.load(base, tuning, "scalar", adjust=lambda m: setattr(m.config, "pad_token_id", 0))
    assert any("score" in n for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "score" in n and p.requires_grad:
                p.add_(1.0)  # a trained head
    ids = torch.tensor([[5, 17, 99, 3]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    tuning_lib.export(model, tuning, tmp_path / "model", base=base, adapter=tmp_path / "adapter", kind="scalar")
    with torch.no_grad():
        got = load_scalar_model(tmp_path / "model")(input_ids=ids).logits
        adapted = load_adapter(tmp_path / "adapter", base, "scalar")(input_ids=ids).logits  # on the original base
    assert torch.allclose(want, got, atol=1e-5)
    assert torch.allclose(want, adapted, atol=1e-4)


def test_torchao_int4_anywhere_and_a_gpu_quantised_folder_without_cuda_are_refused_before_loading(base, tmp_path):
    import json
    import shutil

    from stages.models.folders import inspect_model
    from stages.models.modeling import ModelError
    from stages.models.peft_setup import check_quantization

    with pytest.raises(ValueError, match=r"peft.quant_method=torchao with peft.quant_bits=4: .*int8 weights only"):
        check_quantization(PeftConfig(method="qlora", quant_method="torchao", quant_bits=4))  # on a GPU too
    check_quantization(PeftConfig(method="qlora", quant_method="torchao", quant_bits=8))
    with pytest.raises(ValueError, match=r"peft.quant_method: 'hqq' is not one of bitsandbytes, torchao"):
        PeftConfig(method="qlora", quant_method="hqq")
    gptq = shutil.copytree(base, tmp_path / "gptq")  # a folder as GPTQ tools write it: config.json says so
    config = json.loads((gptq / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (gptq / "config.json").write_text(json.dumps(config))
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the GPTQ folder would load")
    with pytest.raises(ModelError, match=r"model.name_or_path: .*gptq: a GPTQ-quantised model; .*CUDA GPU and the "
                       r"gptqmodel package"):  # fmt: skip
        inspect_model(gptq, key="model.name_or_path")


def test_qlora_refuses_a_base_too_narrow_for_the_cpu_4bit_kernels(base):
    with pytest.raises(ValueError, match=r"qlora on CPU: .*multiples of 64; .* takes 32"):
        tuning_lib.load(base, Tuning(PeftConfig(method="qlora", r=R)), "causal_lm")


@pytest.mark.parametrize("kind", ["causal_lm", "scalar"])
def test_houlsby_folder_is_the_plain_base_plus_its_bottlenecks_and_loads_back(base, tmp_path, kind):
    """Bottlenecks do not merge: the exported folder holds the unchanged base weights (a plain
    `from_pretrained` folder, which alone gives the base) and houlsby.safetensors beside them, which
    alignflow's loader puts back: the trained model's outputs, to the float."""
    from transformers import AutoModelForCausalLM

    from stages.models import houlsby
    from stages.models.modeling import load_causal_lm, load_scalar_model

    torch.manual_seed(0)
    tuning = Tuning(PeftConfig(method="houlsby", adapter_size=M, adapter_placement="both"))
    model = tuning_lib.load(base, tuning, kind, adjust=lambda m: setattr(m.config, "pad_token_id", 0))
    ids = torch.tensor([[5, 17, 99, 3, 42, 7], [8, 1, 4, 4, 2, 9]])
    with torch.no_grad():
        at_insertion = model(input_ids=ids).logits
    if kind == "causal_lm":  # up = 0: the identity (a scalar model's new head is random on every load)
        with torch.no_grad():
            torch.testing.assert_close(at_insertion, load_causal_lm(base)(input_ids=ids).logits)
    opt = tuning_lib.optimizer(model, tuning, lr=1e-2)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        _loss(model, kind, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}).backward()
        opt.step()
    model.eval()
    tuning_lib.export(model, tuning, tmp_path / "out", base=base, adapter=tmp_path / "adapter", kind=kind)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [houlsby.CONFIG, houlsby.WEIGHTS]
    n_adapter = sum(p.numel() for n, p in model.named_parameters() if houlsby.is_adapter(n))
    assert n_adapter == LAYERS * 2 * (H * M + M + M * H + H)
    loaded = (load_causal_lm if kind == "causal_lm" else load_scalar_model)(tmp_path / "out").eval()
    loaded.config.pad_token_id = 0
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained)
    assert not torch.allclose(trained, at_insertion)
    if kind == "causal_lm":  # without alignflow's loader: the base, since the base weights did not change
        bare = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
        with torch.no_grad():
            torch.testing.assert_close(bare(input_ids=ids).logits, at_insertion)
