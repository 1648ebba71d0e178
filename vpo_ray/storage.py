"""One URI abstraction for every artifact: local paths, NFS, and s3/gs/... via fsspec.

Writes are atomic (temp file, then rename; on object stores a single PUT), so a
crash never leaves a partial file that a rerun would mistake for a complete one.
`safe_join` keeps every output inside its run root (no path traversal).

Local files and folders get mode 0666/0777 less the umask `VPO_UMASK` (octal, default
022: readable by the group and others), whatever the process umask is: run folders
on a shared volume are read by other users and pods (a temp file alone would be 0600).
`apply_umask()` sets the same umask for the process, so libraries writing on their own
(Hugging Face exports, Ray Data parquet) follow it; the CLI calls it at start.
"""
from __future__ import annotations

import json
import os
import posixpath
import tempfile
import time
import uuid
from typing import Any, Iterable, Iterator

import fsspec


TMP_PREFIX = ".tmp-"  # every local atomic write goes through a temp file named so (see sweep_tmp)
UMASK_ENV = "VPO_UMASK"
DEFAULT_UMASK = 0o022  # files 0644, folders 0755: a shared volume's other readers can read the runs


class StorageError(OSError):
    """An artifact could not be read or written; the message names the URI."""


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _local(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def fs_for(uri: str) -> tuple[Any, str]:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def join(root: str, *parts: str) -> str:
    if is_local(root):
        return os.path.join(_local(root), *parts)
    return posixpath.join(root, *parts)


def safe_join(root: str, *parts: str) -> str:
    """join() that refuses names escaping `root` ('..', absolute parts, NUL)."""
    for p in parts:
        if not p or "\x00" in p or p.startswith(("/", "\\")) or ".." in p.replace("\\", "/").split("/"):
            raise StorageError(f"unsafe path component {p!r} under {root}")
    return join(root, *parts)


def umask() -> int:
    """The umask for artifacts: $VPO_UMASK (octal: 022, 0o027) or DEFAULT_UMASK."""
    raw = os.environ.get(UMASK_ENV, "").strip()
    if not raw:
        return DEFAULT_UMASK
    try:
        value = int(raw[2:] if raw.lower().startswith("0o") else raw, 8)
    except ValueError:
        value = -1
    if not 0 <= value <= 0o777:
        raise StorageError(f"{UMASK_ENV}={raw!r} is not an octal umask such as 022 or 027")
    return value


def apply_umask() -> int:
    """Set the process umask to umask(); returns it."""
    value = umask()
    os.umask(value)
    return value


def set_modes(path: str) -> None:
    """Give a local file, or a folder and everything below it, the umask's modes (0644/0755 by
    default; execute bits kept). For files other writers made privately (a mkstemp, a library's
    own temp-and-rename) before they are published into a run folder."""
    mask = umask()

    def chmod(p: str, is_dir: bool) -> None:
        current = os.stat(p).st_mode & 0o777
        os.chmod(p, (0o777 if is_dir or current & 0o111 else 0o666) & ~mask)

    chmod(path, os.path.isdir(path))
    for root, dirs, files in os.walk(path):
        for d in dirs:
            chmod(os.path.join(root, d), True)
        for f in files:
            chmod(os.path.join(root, f), False)


def _makedirs_local(path: str) -> None:
    """os.makedirs, then the umask's mode on every folder it created (not on existing ones)."""
    created, p = [], os.path.abspath(path)
    while not os.path.isdir(p) and os.path.dirname(p) != p:
        created.append(p)
        p = os.path.dirname(p)
    os.makedirs(path, exist_ok=True)
    mode = 0o777 & ~umask()
    for d in created:
        try:
            os.chmod(d, mode)
        except OSError:  # made by another writer meanwhile, not ours to change
            pass


def makedirs(uri: str) -> None:
    try:
        if is_local(uri):
            _makedirs_local(_local(uri))
        else:
            fs, path = fs_for(uri)
            fs.makedirs(path, exist_ok=True)
    except OSError as e:
        raise StorageError(f"cannot create directory {uri}: {e.strerror or e}") from e


def exists(uri: str) -> bool:
    if is_local(uri):
        return os.path.exists(_local(uri))
    fs, path = fs_for(uri)
    return fs.exists(path)


def write_bytes(uri: str, data: bytes) -> None:
    """Atomic write: readers see the old file or the whole new one, never a part."""
    try:
        if is_local(uri):
            path = _local(uri)
            d = os.path.dirname(path) or "."
            _makedirs_local(d)
            fd, tmp = tempfile.mkstemp(dir=d, prefix=TMP_PREFIX, suffix=os.path.basename(path))
            try:
                with os.fdopen(fd, "wb") as f:
                    os.fchmod(f.fileno(), 0o666 & ~umask())  # mkstemp makes 0600
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        else:
            fs, path = fs_for(uri)
            with fs.open(path, "wb") as f:
                f.write(data)
    except OSError as e:
        raise StorageError(f"cannot write {uri}: {e.strerror or e}") from e


def sweep_tmp(directory: str, older_than_s: float = 3600) -> int:
    """Delete the temp files of atomic writes older than `older_than_s` in `directory`
    (not below it); returns how many went.

    A process killed between a temp file's write and its rename leaves the temp behind,
    and nothing else ever deletes it. Younger ones stay: a live writer (another actor, a
    second run on the same output) may still own them. Object stores get one PUT and no
    temp, so remote URIs have nothing to sweep. Best effort: a file that cannot be
    removed is left for the next sweep.
    """
    if not is_local(directory):
        return 0
    cutoff = time.time() - older_than_s
    removed = 0
    try:
        with os.scandir(_local(directory)) as it:
            entries = list(it)
    except OSError:  # missing or unreadable: the run's own writes will report a real problem
        return 0
    for e in entries:
        try:
            if (e.name.startswith(TMP_PREFIX) and e.is_file(follow_symlinks=False)
                    and e.stat(follow_symlinks=False).st_mtime < cutoff):
                os.unlink(e.path)
                removed += 1
        except OSError:  # renamed or removed by its writer meanwhile
            continue
    return removed


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def read_bytes(uri: str) -> bytes:
    try:
        if is_local(uri):
            with open(_local(uri), "rb") as f:
                return f.read()
        fs, path = fs_for(uri)
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"not found: {uri}") from None
    except OSError as e:
        raise StorageError(f"cannot read {uri}: {e.strerror or e}") from e


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


def write_jsonl(uri: str, rows: Iterable[dict]) -> int:
    lines = [json.dumps(r, ensure_ascii=False, default=str) for r in rows]
    write_text(uri, "\n".join(lines) + ("\n" if lines else ""))
    return len(lines)


def read_jsonl(uri: str) -> Iterator[dict]:
    if not exists(uri):
        return iter(())
    # split on "\n" only: str.splitlines also breaks at U+2028, U+0085 and friends, which
    # json.dumps(ensure_ascii=False) leaves unescaped inside strings (model output has them).
    return (json.loads(line) for line in read_text(uri).split("\n") if line.strip())


def listdir(uri: str) -> list[str]:
    if is_local(uri):
        p = _local(uri)
        return sorted(os.listdir(p)) if os.path.isdir(p) else []
    fs, path = fs_for(uri)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(x.rstrip("/")) for x in fs.ls(path, detail=False))


def unique_name(prefix: str, suffix: str = "") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}{suffix}"


def local_path(uri: str) -> str:
    """A local filesystem path for `uri`; remote URIs raise (callers copy first)."""
    if not is_local(uri):
        raise StorageError(f"{uri} is not a local path")
    return _local(uri)
