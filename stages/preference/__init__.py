"""Ranked comparisons as a training and scoring signal, shared by the reward model, DPO, PPO, evaluate
and the labelers: rankings to pairs and agreement (`rankings`), a trained reward model and DPO's
implicit reward as scorers (`scorers`). Imports `models`, `data` and `runtime`, never a stage module.
"""
