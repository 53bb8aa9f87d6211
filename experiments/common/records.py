"""Metrics files: JSON lines, one record per line, each with ``method``, ``seed``, ``step`` and
``kind`` (``"train"``: means of the train-step metrics since the last one; ``"eval"``; ``"final"``).

Appends are single writes; `read_records` drops a torn last line (a run killed mid-write) and
names the file and line of any other damage; `keep_until` rewrites atomically.

>>> import pathlib, tempfile
>>> path = pathlib.Path(tempfile.mkdtemp()) / "metrics.jsonl"
>>> for step in (1, 2, 3):
...     append_record(path, {"method": "sste", "seed": 0, "step": step, "kind": "train", "loss": 1.0 / step})
>>> keep_until(path, 2)
>>> [r["step"] for r in read_records(path)]
[1, 2]
"""

import json
import os
import pathlib
import sys

KINDS = ("train", "eval", "final")


def append_record(path: pathlib.Path, record: dict) -> None:
    """Appends ``record`` (a dict with ``kind`` in `KINDS`) as one line."""
    if record.get("kind") not in KINDS:
        raise ValueError(f"record kind must be one of {KINDS}, got {record.get('kind')!r}")
    with pathlib.Path(path).open("a") as f:
        f.write(json.dumps(record) + "\n")


def read_records(path: pathlib.Path) -> list[dict]:
    """The records of ``path``; a torn last line is dropped with a warning, other damage raises."""
    path = pathlib.Path(path)
    text = path.read_text()
    lines = text.split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1 and not text.endswith("\n"):
                print(f"warning: {path}: dropping a torn last line (line {i + 1}): {line[:60]!r}", file=sys.stderr)
                break
            raise ValueError(f"{path}, line {i + 1}: not a JSON record ({e.msg}): {line[:80]!r}") from None
    return records


def write_records(path: pathlib.Path, records: list[dict]) -> None:
    """Replaces ``path`` with ``records`` atomically (a temporary file, then a rename)."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def keep_until(path: pathlib.Path, step: int) -> None:
    """Drops the records after ``step`` and any final record (a resumed run writes them again)."""
    path = pathlib.Path(path)
    if path.exists():
        write_records(path, [r for r in read_records(path) if r["step"] <= step and r.get("kind") != "final"])


def last_step(path: pathlib.Path) -> int:
    """The step of the last complete record of ``path`` (0 if none): a cheap read of the file's tail."""
    try:
        with pathlib.Path(path).open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            tail = f.read().decode(errors="replace").split("\n")
    except FileNotFoundError:
        return 0
    for line in reversed(tail[:-1]):  # the last element follows the final newline (or is torn)
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0
