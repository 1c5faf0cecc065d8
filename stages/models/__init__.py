"""Model machinery: loading and sampling (`modeling`), the fine-tuning methods (`peft_setup`, `tuning`,
Houlsby bottlenecks in `houlsby`), optimizers and schedules (`optim`), precision and attention kernels
(`compute`), preflight's checks of a model folder (`folders`).
Imported by the stage modules and by `preference`, `labeling` and `rl`; imports `data` and `runtime`.
"""
