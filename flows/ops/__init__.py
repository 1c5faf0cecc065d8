"""Operating the align flow: the served deployment (`serve`), new-data events (`notify`), a work pool
with local workers (`workers`) and the registry's champion (`champion`). Imports the flow
(`flows.pipeline`) and below; nothing in the flow imports it.
"""
