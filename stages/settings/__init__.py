"""The config schema: every config dataclass, its defaults and its rules, in modules that import no torch,
transformers or optional backend. Composing, validating and probing the cache of a run import only these;
the stage modules import their config from here."""
