"""Starting and guarding processes: torchrun process groups (`launch`) and each rank's entry (`rank`),
thread caps and resource errors (`resources`), the fault-injection points (`faults`), where a stage's
metrics go (`metrics`: its MLflow run), the watch on a run's tracking servers (`backends`) and the
Prefect server a run records itself on (`prefect_server`). Imported by the runner and the flow; imports
`stages` machinery only.
"""
