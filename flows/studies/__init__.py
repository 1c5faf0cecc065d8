"""Runs of the flow compared with each other: a sweep's parent run and frontier callback (`sweep`), the
branch comparison (`compare`) and the reward-vs-KL frontier (`frontier`). Imports the flow
(`flows.pipeline`) and below; nothing in the flow imports it.
"""
