"""Model machinery: loading and sampling (`modeling`), the fine-tuning methods (`peft_setup`, `tuning`,
Houlsby bottlenecks in `houlsby`), optimizers and schedules (`optim`), precision and attention kernels
(`compute`), preflight's checks of a model folder (`folders`), vision-language models: the LLaVA
reward/value class and the embedded LLaVA's processor (`vision`; the model is `modeling.build_tiny_llava`).
Imported by the stage modules and by `preference`, `labeling` and `rl`; imports `data` and `runtime`.
"""
