"""The config schema: every config dataclass, its defaults, its constants and its rules (`data`, `models`,
`labeling`, `distributed`, `recipe`), in modules that import no torch, transformers or optional backend,
so that composing and checking a config, and probing the cache of a run, stay fast.
Imported by the stage modules, the machinery above it (data, models, preference, labeling, rl) and
`flows`; imports only `runtime` (its rules and errors).
"""
