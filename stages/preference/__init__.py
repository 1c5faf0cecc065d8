"""Ranked comparisons as a training and scoring signal: rankings to pairs and agreement (`rankings`),
a trained reward model and DPO's implicit reward as scorers (`scorers`). Imported by the reward-model,
DPO, PPO and evaluate stages and by `labeling`; imports `models`, `data` and `runtime`, never a stage.
"""
