"""Reinforcement-learning machinery of the PPO stage: the maths on hand-checkable tensors (`ppo_math`),
the policy/value/reference layouts (`ppo_models`) and the rollout engines (`rollout`).
Imported by `stages/ppo.py`; imports `models`, `data` and `runtime`.
"""
