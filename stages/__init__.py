"""alignflow stages: pure, typed `run(cfg, *, inputs, out_dir) -> Manifest` functions.

Nothing here imports Prefect or Hydra; `flows/` wires these together.
"""
