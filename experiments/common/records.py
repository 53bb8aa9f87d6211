"""Metrics files: JSON lines, one record per line, each with ``method``, ``seed``, ``step`` and
``kind`` (``"train"``: means of the train-step metrics since the last one; ``"eval"``; ``"final"``).

Appends are single writes; `read_records` drops a torn last line (a run killed mid-write) and
raises `BadFileError` naming the file and line of any other damage (not JSON, not a record);
`keep_until` rewrites atomically. `read_json` reads the other JSON files a command reads
(``run.json``, an export's ``config.json``) with the same kind of error.

>>> import pathlib, tempfile
>>> path = pathlib.Path(tempfile.mkdtemp()) / "metrics.jsonl"
>>> for step in (1, 2, 3):
...     append_record(path, {"method": "sste", "seed": 0, "step": step, "kind": "train", "loss": 1.0 / step})
>>> [r["step"] for r in keep_until(path, 2)]  # the records kept, also on disk
[1, 2]
>>> [r["step"] for r in read_records(path)]
[1, 2]
"""

import json
import os
import pathlib
import sys
from typing import Any

KINDS = ("train", "eval", "final")


class BadFileError(ValueError):
    """A file a command reads is missing, unreadable, or does not hold what it must; the message names
    the file and what is wrong with it."""


def read_json(path: pathlib.Path) -> Any:
    """The JSON value in ``path``; `BadFileError` naming it when it is missing, not UTF-8, empty or not JSON."""
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadFileError(f"{path} is missing") from None
    except UnicodeDecodeError as e:
        raise BadFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise BadFileError(f"{path} is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadFileError(f"{path}, line {e.lineno} column {e.colno}: not valid JSON ({e.msg})") from None


def _record_problem(record) -> str | None:
    """Why ``record`` is not a metrics record (an object with method, seed, step and kind), or None."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not a record object"
    for name, kind in {"method": str, "seed": int, "step": int, "kind": str}.items():
        if name not in record:
            return f"it has no {name}"
        if not isinstance(record[name], kind) or isinstance(record[name], bool):
            return f"its {name} is {record[name]!r}, not {'a string' if kind is str else 'an integer'}"
    if record["kind"] not in KINDS:
        return f"its kind is {record['kind']!r}, not one of {KINDS}"
    return None


def append_record(path: pathlib.Path, record: dict) -> None:
    """Appends ``record`` (a dict with ``kind`` in `KINDS`) as one line."""
    if record.get("kind") not in KINDS:
        raise ValueError(f"record kind must be one of {KINDS}, got {record.get('kind')!r}")
    with pathlib.Path(path).open("a") as f:
        f.write(json.dumps(record) + "\n")


def read_records(path: pathlib.Path) -> list[dict]:
    """The records of ``path``; a torn last line is dropped with a warning, other damage raises
    `BadFileError` naming the file and line."""
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BadFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    lines = text.split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1 and not text.endswith("\n"):
                print(f"warning: {path}: dropping a torn last line (line {i + 1}): {line[:60]!r}", file=sys.stderr)
                break
            raise BadFileError(f"{path}, line {i + 1}: not a JSON record ({e.msg}): {line[:80]!r}") from None
        if problem := _record_problem(record):
            raise BadFileError(f"{path}, line {i + 1}: not a metrics record: {problem}")
        records.append(record)
    return records


def write_records(path: pathlib.Path, records: list[dict]) -> None:
    """Replaces ``path`` with ``records`` atomically (a temporary file, then a rename)."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def keep_until(path: pathlib.Path, step: int, drop_eval_at_step: bool = False) -> list[dict]:
    """Drops the records after ``step`` and any final record (a resumed run writes them again); with
    ``drop_eval_at_step``, also the evaluation at ``step`` (a run resumed at its last step evaluates again).
    Returns the records kept (none when ``path`` does not exist)."""
    path = pathlib.Path(path)
    if not path.exists():
        return []
    kept = [r for r in read_records(path) if r["step"] <= step and r.get("kind") != "final"
            and not (drop_eval_at_step and r.get("kind") == "eval" and r["step"] == step)]
    write_records(path, kept)
    return kept


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
