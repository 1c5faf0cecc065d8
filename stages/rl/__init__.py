"""Reinforcement-learning machinery of the PPO stage: the maths on hand-checkable tensors (`ppo_math`),
what is optimised (`scoring`: the reward model, the judge, rewards computed by user code in `rewards`),
the resumable state (`ppo_state`), one update in three steps (`ppo_update`), the policy/value/reference
layouts (`ppo_models`), the rollout engines (`rollout`), the rollout worker of asynchronous rollouts
(`async_rollouts`), multi-turn rollouts that call tools (`tools`), the over-optimisation watch (`watch`)
and DAPO's dynamic sampling (`dynamic_sampling`).
Imported by `stages/ppo.py`; imports `preference`, `models`, `data`, `settings` and `runtime`.
"""
