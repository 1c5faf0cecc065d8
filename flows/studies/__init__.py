"""Runs of the flow compared with each other: a sweep's parent run and frontier callback (`sweep`), the
branch comparison (`compare`) and the reward-vs-KL frontier (`frontier`). Imported by the command line
and by Hydra (the sweep callback in `conf/config.yaml`); imports the flow and below, never the reverse.
"""
