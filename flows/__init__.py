"""alignflow flows: Prefect wiring of the stages in `stages/`, configured with Hydra.

Importing this package pins the orchestration state inside the project and turns telemetry off,
before Prefect or MLflow are imported.
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

for _key, _value in {
    "PREFECT_HOME": str(ROOT / ".prefect"),
    "PREFECT_LOCAL_STORAGE_PATH": str(ROOT / ".prefect" / "results"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_API_HOST": "127.0.0.1",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
}.items():
    os.environ.setdefault(_key, _value)

import logging  # noqa: E402

for _name in ("httpx", "httpcore", "alembic", "mlflow", "prefect", "urllib3"):
    logging.getLogger(_name).setLevel(logging.WARNING)
