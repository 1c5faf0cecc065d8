"""What every stage runs inside: typed manifests and atomic folders (`manifest`), checkpoints, progress,
metric logging through the sink the flow sets (`tracking`; never MLflow itself), text diagnostics and
verdicts (`diagnostics`), process groups and the `Engine` that trains one module in one process, under DDP
or ZeRO (`process_group`), the one resumable training loop of our own trainers over it (`training`), the
device guard that checks every stage's tensors are made on a named device (`device_guard`), every config
key's valid range (`rules`) and the expected failures the command line prints in one line (`errors`).
Imported by every stage, by the machinery above it and by `flows`; the bottom layer, it imports no other
alignflow package.
"""
