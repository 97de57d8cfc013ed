"""Resumable stages of `polyp-ssl reproduce`: each stage's identity, its record, and running it.

A stage's identity is what its output depends on: its commands and options, the listing of the
raw files it reads (names, sizes and modification times, hashed), and the fingerprints of the
stages before it. `OUT/stages/NAME.json` records the identity of the last run that finished and
the fingerprint of what it wrote (sizes and modification times of its output files). A stage is
skipped when both still hold; otherwise it runs again and says why (an option changed, an input
changed, a stage before it ran again, its output changed or went missing, or its last run did
not finish). Each command runs as a child process (`python -m polyp_ssl CMD ...`), its output in
`OUT/logs/NAME.log`, so a killed run leaves the children's own recovery (staged writes, `train
--resume`) to the next.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STAGES_DIR = "stages"
LOGS_DIR = "logs"
RECORD_VERSION = 1


class StageFailed(RuntimeError):
    """A stage's command failed; the message names the stage, the command and its log. `code` is
    the command's exit code (2: bad input, which `reproduce` passes on)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Stage:
    name: str
    identity: dict[str, Any]  # options, commands, input listings (JSON-able)
    outputs: Callable[[], list[Path]]  # the files whose state is the stage's fingerprint
    run: Callable[[StageRun], None]
    needs: tuple[str, ...] = ()  # stages whose fingerprints belong to this one's identity
    missing: str | None = None  # the omitted input that keeps this stage from running


@dataclass
class StageRun:
    """What a running stage knows: where it logs, whether it continues an interrupted run."""

    out: Path
    name: str
    resumed: bool  # the last run of this same identity was interrupted
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.out / LOGS_DIR / f"{self.name}.log"

    def command(self, argv: list[str]) -> None:
        """Run `polyp-ssl ARGV` as a child process, its output appended to the stage's log."""
        run_child(argv, self.log_path, self.name)


def run_child(argv: list[str], log_path: Path, stage: str) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as f:
        # on a line of its own (a killed command's progress bar may have left its line open)
        f.write(f"{chr(10) if f.tell() else ''}$ polyp-ssl {' '.join(argv)}\n")
        f.flush()
        rc = subprocess.run(
            [sys.executable, "-m", "polyp_ssl", *argv], stdout=f, stderr=subprocess.STDOUT, check=False
        ).returncode
    if rc != 0:
        raise StageFailed(
            f"stage {stage}: polyp-ssl {argv[0]} exited {rc} ({last_line(log_path)}); "
            f"its output: {log_path}; fix it and run the same command again to go on",
            rc,
        )


def last_line(path: Path) -> str:
    """The log's last error line (`...: error: ...`), else its last non-empty line, at most 300
    characters: what the one-line failure quotes."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 8192))
            lines = [x for x in f.read().decode("utf-8", "replace").splitlines() if x.strip()]
    except OSError:
        return "no output"
    errors = [x for x in lines if ": error: " in x]
    return (errors or lines or ["no output"])[-1].strip()[:300]


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def listing_hash(root: Path) -> dict[str, Any]:
    """Files under `root` (or the one file), each as relative name, size and modification time,
    hashed in sorted order: changes when a file is added, removed, replaced or rewritten."""
    h = hashlib.sha256()
    count = 0
    if root.is_file():
        st = root.stat()
        h.update(f"{root.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return {"files": 1, "sha256": h.hexdigest()}
    stack = [root]
    entries: list[str] = []
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                    continue
                st = e.stat(follow_symlinks=False)
                entries.append(f"{os.path.relpath(e.path, root)}\0{st.st_size}\0{st.st_mtime_ns}\n")
    for line in sorted(entries):
        h.update(line.encode("utf-8", "surrogateescape"))
        count += 1
    return {"files": count, "sha256": h.hexdigest()}


def fingerprint(paths: Iterable[Path], out: Path) -> str | None:
    """The state of a stage's output files (names relative to OUT, sizes, modification times);
    None when one is missing."""
    parts = []
    for p in sorted(paths):
        try:
            st = p.stat()
        except OSError:
            return None
        parts.append([os.path.relpath(p, out), st.st_size, st.st_mtime_ns])
    return digest(parts)


def relocatable(obj: Any, out: Path) -> Any:
    """`obj` with OUT's path written as `{OUT}`, so a moved or copied OUT keeps its records."""
    if isinstance(obj, dict):
        return {k: relocatable(v, out) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [relocatable(v, out) for v in obj]
    if isinstance(obj, str):
        return obj.replace(str(out), "{OUT}")
    return obj


def _record_path(out: Path, name: str) -> Path:
    return out / STAGES_DIR / f"{name}.json"


def read_record(out: Path, name: str) -> dict[str, Any] | None:
    """A stage's record (bounded, read as JSON); None when absent or unreadable (the stage reruns)."""
    path = _record_path(out, name)
    try:
        if path.stat().st_size > 1 << 20:
            return None
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("version") == RECORD_VERSION else None


def write_record(out: Path, name: str, record: dict[str, Any]) -> None:
    path = _record_path(out, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"version": RECORD_VERSION, **record}, indent=1, sort_keys=True, default=str))
    tmp.replace(path)


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two identities."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}" + (f" ({argv_diff(a, b)})" if argv_diff(a, b) else ""))
    return out


def _options(argv: list[str]) -> dict[str, str]:
    """`polyp-ssl CMD ...` as {option: its values} (positional arguments under their position)."""
    opts: dict[str, str] = {}
    key = None
    for i, token in enumerate(argv):
        if token.startswith("--"):
            key = token
            opts[key] = ""
        elif key is None:
            opts[f"argument {i}"] = token
        else:
            opts[key] = f"{opts[key]} {token}".strip()
    return opts


def argv_diff(old: Any, new: Any) -> str:
    """What differs between two commands (or lists of commands): `--max_steps 3 -> 4`, `--resume added`."""
    if not (isinstance(old, list) and isinstance(new, list)):
        return ""
    if old and new and all(isinstance(c, list) for c in old + new):
        return "; ".join(d for a, b in zip(old, new, strict=False) if (d := argv_diff(a, b)))
    if not all(isinstance(t, str) for t in old + new):
        return ""
    a, b = _options(old), _options(new)
    parts = []
    for k in [*a, *(k for k in b if k not in a)]:
        if k not in b:
            parts.append(f"{k} removed")
        elif k not in a:
            parts.append(f"{k} {b[k]} added".replace("  ", " "))
        elif a[k] != b[k]:
            parts.append(f"{k} {a[k] or 'on'} -> {b[k] or 'on'}")
    return ", ".join(parts[:4])


def why_rerun(
    record: dict[str, Any] | None, identity: dict[str, Any], outputs: list[Path], out: Path
) -> str | None:
    """None when the stage's last finished run still stands, else the reason it runs again."""
    if record is None:
        return "not run before"
    if record.get("identity") != identity:
        keys = changed_keys(record.get("identity") or {}, identity)
        upstream = [k.split(".", 1)[1] for k in keys if k.startswith("upstream.")]
        inputs = [k for k in keys if k.startswith("inputs.")]
        options = [k for k in keys if not k.startswith(("upstream.", "inputs."))]
        if options:
            return "options changed: " + ", ".join(options[:6])
        if inputs:
            names = dict.fromkeys(k.split(".")[1].split(" ")[0] for k in inputs)
            return "input files changed: " + ", ".join(list(names)[:6])
        return "ran again before it: " + ", ".join(upstream[:6])
    if record.get("state") != "done":
        return None  # the same run, interrupted: continued
    if fingerprint(outputs, out) != record.get("fingerprint"):
        return "its output changed or is missing"
    return None


@dataclass
class Outcome:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    not_run: dict[str, str] = field(default_factory=dict)  # stage -> the omitted input
    seconds: dict[str, float] = field(default_factory=dict)


def run_stages(out: Path, stages: list[Stage], say: Callable[[str], None]) -> Outcome:
    """Run every stage in order, skipping those whose record still stands; a stage whose input
    was omitted is not run (and neither is one that needs it)."""
    outcome = Outcome()
    prints: dict[str, str] = {}
    t_start = time.perf_counter()
    for i, stage in enumerate(stages, 1):
        head = f"[{i}/{len(stages)}] {stage.name}"
        blocked = stage.missing or next(
            (outcome.not_run[n] for n in stage.needs if n in outcome.not_run), None
        )
        if blocked is not None:
            outcome.not_run[stage.name] = blocked
            say(f"{head}: not run ({blocked})")
            continue
        identity = relocatable({**stage.identity, "upstream": {n: prints[n] for n in stage.needs}}, out)
        record = read_record(out, stage.name)
        outputs = stage.outputs()
        reason = why_rerun(record, identity, outputs, out)
        if reason is None and record is not None and record.get("state") == "done":
            prints[stage.name] = record["fingerprint"]
            outcome.skipped.append(stage.name)
            say(f"{head}: unchanged, skipped")
            continue
        resumed = reason is None  # started with this identity and never finished: continue it
        say(f"{head}: {'continuing an interrupted run' if resumed else 'running (' + reason + ')'}")
        write_record(out, stage.name, {"state": "started", "identity": identity})
        t0 = time.perf_counter()
        stage.run(StageRun(out, stage.name, resumed))
        outcome.seconds[stage.name] = time.perf_counter() - t0
        fp = fingerprint(stage.outputs(), out)
        if fp is None:
            raise StageFailed(f"stage {stage.name}: finished but its output is missing; see {out / LOGS_DIR}")
        write_record(out, stage.name, {"state": "done", "identity": identity, "fingerprint": fp})
        prints[stage.name] = fp
        outcome.ran.append(stage.name)
        say(
            f"    {stage.name} done in {outcome.seconds[stage.name]:.1f} s "
            f"(total {time.perf_counter() - t_start:.0f} s)"
        )
    return outcome
