"""The worker processes of one server agree on model loads through files in a shared folder.

With ``SEPCONV_WORKERS`` > 1 every worker has its own model repository, and a load or unload
request reaches only the worker the kernel gave its connection to. So a request is written to a
command log (``commands.jsonl``, appended under an exclusive lock); every worker follows the
log, applies each command in order, and publishes its state (``worker-<pid>.json``, replaced
atomically). The worker that took the request answers once every worker has applied it, and the
repository index merges what all of them publish, so it says when all of them have swapped.

Files rather than pipes to the supervisor: the supervisor stays a plain process manager, and
the same folder works under uvicorn's own workers (no SO_REUSEPORT) too.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

COMMANDS = "commands.jsonl"
LOCK = "commands.lock"
#: Results kept per worker, for the command's issuer to read.
KEEP_RESULTS = 64


@dataclass(frozen=True, slots=True)
class Command:
    seq: int
    action: str  # load | unload
    model: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a command went in one worker: an HTTP status and, for a failure, the reason."""

    status: int
    detail: str = ""


class Fleet:
    """This worker's view of the shared folder ``folder`` of ``workers`` processes."""

    def __init__(self, folder: Path, workers: int) -> None:
        self.folder = folder
        self.workers = workers
        self.me = str(os.getpid())
        folder.mkdir(parents=True, exist_ok=True)
        self._offset = 0
        self.applied = 0
        self.results: dict[int, Outcome] = {}

    # --- commands
    def submit(self, action: str, model: str) -> int:
        """Append a command for every worker; returns its sequence number."""
        with open(self.folder / LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = self.folder / COMMANDS
            seq = 1
            if path.exists():
                seq += sum(1 for _ in path.open("rb"))
            with path.open("a") as log:
                log.write(json.dumps({"seq": seq, "action": action, "model": model}) + "\n")
        return seq

    def new_commands(self) -> list[Command]:
        """Commands appended since the last call (whole lines only)."""
        path = self.folder / COMMANDS
        try:
            with path.open("rb") as log:
                log.seek(self._offset)
                data = log.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self._offset += end
        commands = []
        for line in data[:end].splitlines():
            doc = json.loads(line)
            commands.append(Command(doc["seq"], doc["action"], doc["model"]))
        return commands

    def record(self, seq: int, outcome: Outcome) -> None:
        self.applied = seq
        self.results[seq] = outcome
        for old in sorted(self.results)[:-KEEP_RESULTS]:
            del self.results[old]

    # --- state
    def publish(self, entries: Iterable[dict[str, str]]) -> None:
        """Replace this worker's published state (atomically: readers never see half)."""
        document = {
            "pid": self.me,
            "applied": self.applied,
            "results": {str(k): [v.status, v.detail] for k, v in self.results.items()},
            "models": list(entries),
        }
        path = self.folder / f"worker-{self.me}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(document))
        os.replace(tmp, path)

    def states(self) -> list[dict]:
        """What every worker published last (a worker that has not yet published is absent)."""
        out = []
        for path in sorted(self.folder.glob("worker-*.json")):
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError):
                continue  # replaced while read; the next read sees it
        return out

    async def wait_applied(self, seq: int, timeout_s: float) -> list[Outcome]:
        """Every worker's outcome of command ``seq``, once all of them have applied it."""
        deadline = time.monotonic() + timeout_s
        while True:
            states = self.states()
            done = [s for s in states if s.get("applied", 0) >= seq]
            if len(done) >= self.workers:
                outcomes = []
                for state in done:
                    status, detail = state.get("results", {}).get(str(seq), [200, ""])
                    outcomes.append(Outcome(status, detail))
                return outcomes
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(done)} of {self.workers} workers applied the command within "
                    f"{timeout_s:g} s"
                )
            await asyncio.sleep(0.05)


def merge(states: list[dict], workers: int) -> list[dict[str, str]]:
    """One index from every worker's: an entry is READY only when every worker has it READY;
    otherwise the reason says how many have it and what the others report."""
    by_key: dict[tuple[str, str], list[dict[str, str]]] = {}
    for state in states:
        for entry in state.get("models", []):
            by_key.setdefault((entry["name"], entry["version"]), []).append(entry)
    merged = []
    for (name, version), entries in by_key.items():
        ready = [e for e in entries if e["state"] == "READY"]
        if len(ready) == len(entries) == workers:
            merged.append({"name": name, "version": version, "state": "READY", "reason": ""})
            continue
        others = [e for e in entries if e["state"] != "READY"]
        missing = workers - len(entries)
        # The least advanced state wins: LOADING or UNLOADING while any worker is between,
        # UNAVAILABLE when one failed or has not got there.
        states = {e["state"] for e in others}
        state = next((s for s in ("LOADING", "UNLOADING", "UNAVAILABLE") if s in states), "LOADING")
        if len(entries) == len(others) and not missing:
            # Every worker agrees; say it once.
            reasons = sorted({e["reason"] for e in others if e["reason"]})
            reason = "; ".join(reasons)
        else:
            parts = [f"READY in {len(ready)} of {workers} workers"]
            parts += [f"{e['state']}" + (f": {e['reason']}" if e["reason"] else "") for e in others]
            if missing:
                parts.append(f"{missing} not yet reporting")
            reason = "; ".join(parts)
        merged.append({"name": name, "version": version, "state": state, "reason": reason})
    return merged
