"""Data machinery: reading user files (`reader`), the data sources a stage draws from (`sources`), the
embedded synthetic task with its gold rule (`task`), the embedded verifiable arithmetic task
(`arithmetic`), the embedded tool task (`calculator`), tool calls in text (`tool_calls`), the embedded
visual task (`shapes`), images in prompts (`images`), and tokenisation with its length budgets (`tokens`).
Imported by the stage modules and the machinery above it (models, preference, labeling); imports only
`settings` and `runtime`.
"""
