"""Storage faults: an output path that cannot be created or written, and a disk that fills up mid-run.

Tests run as root in CI, where chmod does not stop a write; so the unwritable output is a
path under a regular file (ENOTDIR) or a read-only tmpfs (EROFS), and the full disk is a
small tmpfs filled up while the job runs. Where `mount` is not allowed, the same faults are
simulated under vpo_ray.storage (tests/reliability/fullfs.py). Invariants: a one-line error
naming the path and no traceback; no partial file that a reader would take as complete;
a rerun after the space frees finishes with the same content as an undisturbed run.
"""
from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from relsupport import (REPO, SFT_QUERIES, accounting, content, gcs_address, gen_cfg, gen_overrides, read_jsonl,
                        subprocess_env, wait_for)

pytestmark = [pytest.mark.timeout(600)]
HERE = Path(__file__).resolve().parent
# a log line Ray forwards from its own processes: "(raylet) ...", "(MapWorker(...) pid=12, ip=...) ..."
RAY_LOG_LINE = re.compile(r"^(\x1b\[\d+m)?\((raylet\)|[^ ]*\s?pid=\d+)")


def _mount_tmpfs(path: Path, size: str, read_only: bool = False) -> bool:
    if os.environ.get("VPO_REL_NO_MOUNT") == "1":
        return False
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, timeout=30)
    return r.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@contextmanager
def small_disk(root: Path, size: str = "4m", read_only: bool = False):
    """(mode, fill, free): a real tmpfs when mount works, else the fullfs simulation's flag file."""
    mnt = root / "mnt"
    flag = root / "disk_full.flag"
    mounted = _mount_tmpfs(mnt, size, read_only)
    filler = mnt / ".filler"

    def fill():
        if mounted:
            with open(filler, "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
        else:
            flag.write_text("ENOSPC")

    def free():
        if mounted:
            filler.unlink(missing_ok=True)
        else:
            flag.unlink(missing_ok=True)

    if not mounted:
        mnt.mkdir(parents=True, exist_ok=True)
        if read_only:
            flag.write_text("EROFS")
    try:
        yield {"mode": "tmpfs" if mounted else "simulated", "dir": mnt, "flag": flag, "fill": fill, "free": free}
    finally:
        if mounted:
            _umount(mnt)


def run_cli_inprocess(argv, capsys):
    from vpo_ray.cli import main

    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def assert_names_path(rc, err, path):
    assert "Traceback" not in err, err[-1500:]
    assert rc == 2, (rc, err[-800:])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("vpo generate: "), err
    assert str(path) in lines[0], lines[0]


def test_output_under_a_regular_file(sft_queries, tmp_path, capsys, rel):
    e = rel("fault", "storage", "output dir under a regular file (ENOTDIR)")
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    out = blocker / "run"
    rc, err = run_cli_inprocess(["generate", "sft", "--queries", sft_queries, "--out", out], capsys)
    e.metrics = {"error": err.strip()[:120]}
    assert_names_path(rc, err, out)
    assert blocker.read_text() == "x"


def test_read_only_output(sft_queries, tmp_path, capsys, rel):
    import fullfs
    from vpo_ray import storage

    e = rel("fault", "storage", "output dir on a read-only filesystem (EROFS)")
    real_os = storage.os
    with small_disk(tmp_path, "1m", read_only=True) as disk:
        try:
            if disk["mode"] == "simulated":
                fullfs.install(str(disk["dir"]), str(disk["flag"]))
            out = disk["dir"] / "run"
            rc, err = run_cli_inprocess(["generate", "sft", "--queries", sft_queries, "--out", out], capsys)
        finally:
            storage.os = real_os
        e.metrics = {"mode": disk["mode"], "error": err.strip()[:120]}
    assert_names_path(rc, err, out)
    assert "Read-only" in err


# Timing fault: the job flushes a part file per finished query (VPO_PART_FLUSH_S=0), so the
# fill lands with most of the run still to write; should a run still outpace the filler, the
# attempt proves nothing either way and is re-run.
@pytest.mark.flaky(reruns=2)
def test_disk_fills_up_mid_run_then_frees(sft_reference, sft_queries, tmp_path, rel):
    """The disk fills once the first part file is written: the job stops with a clear error,
    leaves only complete files, and a rerun after the space frees resumes to the same set."""
    from vpo_ray.pipeline.generate import run_generate

    ref_out, _ = sft_reference
    e = rel("fault", "storage", "disk full mid-run (after the first part file), then space frees: rerun")
    with small_disk(tmp_path, "4m") as disk:
        out = disk["dir"] / "run"
        parts = out / "parts"
        argv = ["generate", *gen_overrides("sft", sft_queries, str(out)), f"ray.address={gcs_address()}"]
        if disk["mode"] == "tmpfs":
            cmd = [sys.executable, "-m", "vpo_ray.cli", *argv]
        else:
            cmd = [sys.executable, str(HERE / "fullfs.py"), str(disk["dir"]), str(disk["flag"]), "--", *argv]
        log = tmp_path / "driver.log"
        # one part file per finished query: the disk fills after the first while most are still to come
        proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(VPO_PART_FLUSH_S="0"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        filled = threading.Event()

        def watch():
            if wait_for(lambda: any(not p.name.startswith(".") for p in parts.glob("*.jsonl"))
                        or proc.poll() is not None, 240, 0.05) and proc.poll() is None:
                disk["fill"]()
                filled.set()

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            stdout, stderr = proc.communicate(timeout=400)
        finally:
            if proc.poll() is None:
                proc.kill()
        watcher.join(10)
        log.write_text(stdout + "\n---- stderr\n" + stderr)
        e.tried = 1 if filled.is_set() else 0
        assert filled.is_set(), f"the job finished before the disk could fill; see {log}"
        # Ray forwards its own processes' log lines to the driver, tagged "(raylet)" / "(pid=...)", and one
        # may land after the CLI's error while the driver exits: the error is the job's last line of its own
        last = [ln for ln in stderr.splitlines() if ln.strip() and not RAY_LOG_LINE.search(ln)][-1]
        e.metrics = {"mode": disk["mode"], "exit_code": proc.returncode, "error": last[:140]}
        assert "Traceback" not in stderr, stderr[-2000:]
        assert proc.returncode == 2, (proc.returncode, stderr[-1500:])
        assert last.startswith("vpo generate: cannot write ") and str(out) in last and "No space left" in last, last
        # nothing half-written is taken for complete: no set, no summary, every part parses
        assert not (out / "sft.parquet").exists() and not (out / "summary.json").exists()
        assert not list(out.rglob(".tmp-*")), "a temp file was left behind"
        done = [rec for p in sorted(parts.glob("*.jsonl")) for rec in read_jsonl(p)]
        assert done and all("rows" in r or "error" in r for r in done)

        disk["free"]()
        summary = run_generate(gen_cfg("sft", sft_queries, str(out)))
        e.metrics.update(resumed=summary["resumed_from_earlier_runs"], processed=summary["processed_this_run"])
        acc = accounting(str(out), "sft", len(SFT_QUERIES))
        e.rows_lost = acc["rows_lost"]
        assert not acc["problems"], acc["problems"]
        assert summary["resumed_from_earlier_runs"] == len(done)
        assert content(str(out), "sft") == content(ref_out, "sft")


@pytest.mark.parametrize("name", ["payload.bin", "sub/dir/payload.bin"])
def test_atomic_write_leaves_old_or_new_never_part(tmp_path, rel, name):
    """A write that fails half-way leaves the previous file whole and no temp file."""
    import fullfs
    from vpo_ray import storage

    e = rel("fault", "storage", f"write fails half-way over an existing file ({name})")
    root = tmp_path / "root"
    target = root / name
    storage.write_bytes(str(target), b"old content\n")
    flag = tmp_path / "flag"
    real_os = storage.os
    fullfs.install(str(root), str(flag))
    try:
        flag.write_text("ENOSPC")
        with pytest.raises(storage.StorageError, match=str(target)):
            storage.write_bytes(str(target), b"new content " * 1000)
    finally:
        storage.os = real_os
    assert target.read_bytes() == b"old content\n"
    assert not list(root.rglob(".tmp-*"))
    e.metrics = {"left": "old file, no temp"}
