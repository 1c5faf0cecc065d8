"""PPO variants on the embedded default, through the real flow: a beta sweep, PPO-ptx on/off, EMA on/off.

Each variant is one `python -m flows.align` run into the same artifacts folder, so prepare, SFT,
comparisons and the reward model are computed once and cached; only `ppo` and `evaluate` rerun.
Writes artifacts/bench/ppo_variants.json. `python -m bench.ppo_variants`.
"""

from __future__ import annotations

from pathlib import Path

from bench.common import flow_variants

OUT = Path("artifacts") / "bench" / "ppo_variants.json"
VARIANTS = {
    "beta=0.005": ["stage.ppo.beta=0.005"],
    "beta=0.02 (default)": [],
    "beta=0.1": ["stage.ppo.beta=0.1"],
    "beta=0.5": ["stage.ppo.beta=0.5"],
    "ptx on": ["+experiment=ptx"],
    "ema off": ["+experiment=no_ema"],
}

if __name__ == "__main__":
    flow_variants(VARIANTS, OUT, "ppo")
