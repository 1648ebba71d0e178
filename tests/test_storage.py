"""Storage: atomic writes, JSONL that survives any model output, no path traversal."""
import os

import pytest

from vpo_ray import storage


def test_jsonl_round_trip_with_unicode_line_separators(tmp_path):
    rows = [{"text": "a\u2028b\u2029c\x85d\x1ce\rf\ng"}, {"text": "一只猫 🐱"}, {"n": 1}]
    uri = str(tmp_path / "x.jsonl")
    storage.write_jsonl(uri, rows)
    assert list(storage.read_jsonl(uri)) == rows


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    uri = str(tmp_path / "out.json")
    storage.write_text(uri, "old")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(storage.StorageError, match="out.json"):
        storage.write_text(uri, "new")
    assert open(uri).read() == "old"
    assert [p for p in os.listdir(tmp_path)] == ["out.json"], "temp file cleaned up"


def test_sweep_tmp_removes_only_old_temp_files_of_that_folder(tmp_path):
    def touch(name: str, age_s: float = 0):
        p = tmp_path / name
        p.parent.mkdir(exist_ok=True)
        p.write_text("x")
        t = os.path.getmtime(p) - age_s
        os.utime(p, (t, t))
        return p

    old = touch(".tmp-abc123part-1.jsonl", age_s=7200)  # a crashed write's leftover
    young = touch(".tmp-def456clip.mp4", age_s=60)  # may belong to a live writer
    kept = touch("part-1.jsonl", age_s=7200)  # real output, however old
    below = touch("parts/.tmp-ghi789x.jsonl", age_s=7200)  # sweeps one folder, not below it

    assert storage.sweep_tmp(str(tmp_path), older_than_s=3600) == 1
    assert not old.exists()
    assert young.exists() and kept.exists() and below.exists()
    assert storage.sweep_tmp(str(tmp_path / "missing")) == 0


@pytest.mark.parametrize("part", ["../x", "/etc/passwd", "a/../../b", "", "a\x00b"])
def test_safe_join_refuses_escapes(tmp_path, part):
    with pytest.raises(storage.StorageError, match="unsafe path"):
        storage.safe_join(str(tmp_path), part)
    assert storage.safe_join(str(tmp_path), "videos", "q_0_1.mp4").startswith(str(tmp_path))
