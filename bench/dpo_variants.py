"""DPO variants on the embedded default, through the real flow: trl's sigmoid loss over a beta set,
IPO, and our listwise Plackett-Luce loss, all from one SFT model and one comparisons artifact.

Each variant is one `python -m flows.align pipeline=dpo` run into the same artifacts folder, so
prepare, SFT and comparisons are computed once and cached; only `dpo` and `evaluate` rerun.
Writes artifacts/bench/dpo_variants.json. `python -m bench.dpo_variants`.
"""

from __future__ import annotations

from pathlib import Path

from bench.common import flow_variants

OUT = Path("artifacts") / "bench" / "dpo_variants.json"
PL = "stage.dpo.loss_type=plackett_luce"
VARIANTS = {
    "sigmoid beta=0.1 (default)": ["pipeline=dpo"],
    "sigmoid beta=0.3": ["pipeline=dpo", "stage.dpo.beta=0.3"],
    "sigmoid beta=1.0": ["pipeline=dpo", "stage.dpo.beta=1.0"],
    "sigmoid beta=1.0, 2 epochs": ["pipeline=dpo", "stage.dpo.beta=1.0", "stage.dpo.epochs=2"],
    "ipo beta=0.3": ["pipeline=dpo", "stage.dpo.loss_type=ipo", "stage.dpo.beta=0.3"],
    "plackett_luce beta=0.1": ["pipeline=dpo", PL, "stage.dpo.beta=0.1"],
    "plackett_luce beta=0.3": ["pipeline=dpo", PL, "stage.dpo.beta=0.3"],
    "plackett_luce beta=1.0": ["pipeline=dpo", PL, "stage.dpo.beta=1.0"],
    "plackett_luce beta=0.3, 2 epochs": ["pipeline=dpo", PL, "stage.dpo.beta=0.3", "stage.dpo.epochs=2"],
}

if __name__ == "__main__":
    flow_variants(VARIANTS, OUT, "dpo")
