"""`python -m flows.ops.notify <path> [<path> ...]`: tell the served deployment that a data file changed.

Emits the Prefect event `schedule.event` (default `alignflow.data.updated`) with the resource
`alignflow.data.<absolute path>` and the file's sha256, to PREFECT_API_URL or `schedule.api_url`.
The deployment served by `make serve` has a trigger on it and starts a run at once. Call it from
whatever lands the data (a cron job, an upload hook, a file watcher).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
from pathlib import Path

from flows.config import ScheduleConfig
from flows.launch import prefect_server
from flows.ops.serve import DATA_RESOURCE


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


async def emit(paths: list[Path], event: str, api_url: str) -> None:
    from prefect.events import Event
    from prefect.events.clients import PrefectEventsClient

    async with PrefectEventsClient(api_url) as client:
        for path in paths:
            resource = {
                "prefect.resource.id": f"{DATA_RESOURCE}.{path}",
                "prefect.resource.name": path.name,
                "alignflow.sha256": sha256(path),
            }
            await client.emit(Event(event=event, resource=resource))


def main(argv: list[str]) -> None:
    defaults = ScheduleConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--event", default=defaults.event)
    parser.add_argument("--api-url", default=os.environ.get("PREFECT_API_URL", defaults.api_url))
    args = parser.parse_args(argv)
    paths = [p.resolve() for p in args.paths]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"error: not a file: {', '.join(missing)}")
    try:
        prefect_server.ping(args.api_url)
    except OSError:
        raise SystemExit(f"error: no Prefect server answers at {args.api_url}; is `make serve` running?") from None
    asyncio.run(emit(paths, args.event, args.api_url))
    for p in paths:
        print(f"emitted {args.event} for {p}")


if __name__ == "__main__":
    main(sys.argv[1:])
