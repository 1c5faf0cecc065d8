"""Operating the align flow: the served deployment (`serve`), new-data events (`notify`), a work pool
with local workers (`workers`), the registry's champion (`champion`) and the team's servers on PostgreSQL
(`server`). Imported by the command line (`flows/cli.py`) alone; imports the flow (`flows.pipeline`) and
below, and nothing in the flow imports it.
"""
