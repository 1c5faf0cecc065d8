"""Talking to a policy: which one (`policies`: the champion, a run's stage, any model folder), served
behind an OpenAI-compatible API (`openai_server`, on the batched `Decoder` of `decoder`), chatted with in
the terminal (`chat`), written as a plain Hugging Face folder with its model card (`export`). Imported by
the command line (`flows/cli.py`) alone; imports the registry (`flows.results`) and below.
"""
