"""Reinforcement-learning machinery of the PPO stage: the maths on hand-checkable tensors (`ppo_math`),
the policy/value/reference layouts (`ppo_models`), the rollout engines (`rollout`), rewards computed by user
code (`rewards`) and the over-optimisation watch (`watch`).
Imported by `stages/ppo.py`; imports `models`, `data` and `runtime`.
"""
