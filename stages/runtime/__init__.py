"""What every stage runs inside: typed manifests and atomic folders (`manifest`), checkpoints, progress,
MLflow logging from a stage (`tracking`), text diagnostics and verdicts (`diagnostics`), and the
process-group engine (`distributed`). The bottom layer: imports no other alignflow package.
"""
