"""Ranked comparisons as a training and scoring signal: rankings to pairs and agreement (`rankings`),
a trained reward model and DPO's implicit reward as scorers (`scorers`), whether a judge's verdict
counts, with the length-controlled win rate (`validity`), and the reference-free and unpaired
preference losses (`losses`: SimPO, ORPO, KTO). Imported by the reward-model,
DPO, PPO and evaluate stages and by `labeling`; imports `models`, `data` and `runtime`, never a stage.
"""
