"""Reinforcement-learning machinery of the PPO stage: the maths on hand-checkable tensors (`ppo_math`),
the policy/value/reference layouts (`ppo_models`), the rollout engines (`rollout`), rewards computed by user
code (`rewards`), the over-optimisation watch (`watch`) and DAPO's dynamic sampling (`dynamic_sampling`).
Imported by `stages/ppo.py`; imports `models`, `data` and `runtime`.
"""
