"""A disk that fills up or refuses writes, for machines where `mount -t tmpfs` is not allowed.

`install(root, flag)` swaps the `os` module that vpo_ray.storage sees for a proxy: while
the file `flag` exists, every write under `root` fails the way a full or read-only disk
fails (the errno named in the flag file, ENOSPC by default) — at the write itself, after
storage has created its temp file, so its atomic-write clean-up is exercised too. Only
vpo_ray.storage is affected; the rest of the process sees the real os.
"""
from __future__ import annotations

import errno
import os
import sys


class _FailingFile:
    def __init__(self, f, code: int, path: str):
        self._f, self._code, self._path = f, code, path

    def write(self, data):
        # a full disk takes part of the data, then refuses
        self._f.write(data[: len(data) // 2])
        raise OSError(self._code, os.strerror(self._code), self._path)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()
        return False


class FaultyOS:
    def __init__(self, root: str, flag: str):
        self._root = os.path.realpath(root)
        self._flag = flag

    def _code(self, path) -> int:
        try:
            p = os.path.realpath(os.fspath(path))
        except TypeError:
            return 0
        if not (p == self._root or p.startswith(self._root + os.sep)) or not os.path.exists(self._flag):
            return 0
        with open(self._flag) as f:
            name = f.read().strip() or "ENOSPC"
        return getattr(errno, name)

    def fdopen(self, fd, *args, **kwargs):
        f = os.fdopen(fd, *args, **kwargs)
        path = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        code = self._code(path)
        return _FailingFile(f, code, path) if code else f

    def makedirs(self, path, *args, **kwargs):
        code = self._code(path)
        if code and not os.path.isdir(path):
            raise OSError(code, os.strerror(code), os.fspath(path))
        return os.makedirs(path, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(os, name)


def install(root: str, flag: str) -> None:
    from vpo_ray import storage

    storage.os = FaultyOS(root, flag)


if __name__ == "__main__":  # python fullfs.py ROOT FLAG -- vpo args...
    root, flag, sep, *argv = sys.argv[1:]
    assert sep == "--"
    install(root, flag)
    from vpo_ray.cli import main

    sys.exit(main(argv))
