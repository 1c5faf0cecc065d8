"""Who ranks the responses: the simulated, file and cached labelers (`labelers`) and the AI labeler with
its local or HTTP judge (`ai_labeler`), and each evaluation judge measured against held-out human
preferences (`judges`). Imported by the comparisons, judge, PPO and evaluate stages;
imports `preference`, `models`, `data` and `runtime`.
"""
