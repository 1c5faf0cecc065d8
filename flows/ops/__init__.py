"""Operating the align flow: the served deployment (`serve`), new-data events (`notify`), a work pool
with local workers (`workers`), the registry's champion (`champion`); the team's servers on PostgreSQL
(`server`); and talking to a policy: which one (`sources`), served behind an OpenAI-compatible API
(`serve_model`, on the batched decoder of `engine`), chatted with in the terminal (`chat`), written
as a plain Hugging Face folder (`export`). Imported by the command line (`flows/cli.py`) alone;
imports the flow (`flows.pipeline`) and below, and nothing in the flow imports it.
"""
