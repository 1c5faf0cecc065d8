"""Starting and guarding processes: torchrun process groups (`launch`) and each rank's entry (`rank`),
thread caps and resource errors (`resources`), and the fault-injection points (`faults`).
Imported by the runner and the flow; imports `stages` machinery only.
"""
