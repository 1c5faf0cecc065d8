"""alignflow stages: pure, typed `run(cfg, *, inputs, out_dir) -> Manifest` functions.

The top of this package holds the stage modules and nothing else (prepare, sft, comparisons,
reward_model, ppo, dpo, judge, evaluate); the machinery they share lives in the subpackages below
them (rl, labeling, preference, models, data, runtime), each saying what it holds and who may import
it. Nothing here imports Prefect or Hydra; `flows/` wires these together. Telemetry of the libraries the
stages use stays off even when a stage runs alone from a REPL.
"""

import os

for _key, _value in {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}.items():
    os.environ.setdefault(_key, _value)
