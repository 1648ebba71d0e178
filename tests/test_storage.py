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


@pytest.fixture
def strict_process_umask():
    """A process umask that would make everything private: the artifacts' modes must not follow it."""
    old = os.umask(0o077)
    yield
    os.umask(old)


def _mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def test_artifacts_are_group_and_world_readable_by_default(tmp_path, monkeypatch, strict_process_umask):
    monkeypatch.delenv(storage.UMASK_ENV, raising=False)
    uri = str(tmp_path / "run" / "parts" / "part-1.jsonl")
    storage.write_jsonl(uri, [{"a": 1}])
    storage.makedirs(str(tmp_path / "run" / "videos"))
    assert _mode(uri) == 0o644
    assert _mode(tmp_path / "run") == _mode(tmp_path / "run" / "parts") == _mode(tmp_path / "run" / "videos") == 0o755


@pytest.mark.parametrize("value,file_mode,dir_mode", [("027", 0o640, 0o750), ("0o007", 0o660, 0o770),
                                                       ("077", 0o600, 0o700)])
def test_vpo_umask_sets_the_modes(tmp_path, monkeypatch, value, file_mode, dir_mode):
    monkeypatch.setenv(storage.UMASK_ENV, value)
    uri = str(tmp_path / "out" / "summary.json")
    storage.write_json(uri, {"ok": True})
    assert (_mode(uri), _mode(tmp_path / "out")) == (file_mode, dir_mode)


def test_existing_folders_keep_their_mode(tmp_path, monkeypatch):
    monkeypatch.setenv(storage.UMASK_ENV, "022")
    (tmp_path / "mine").mkdir(mode=0o700)
    os.chmod(tmp_path / "mine", 0o700)
    storage.write_text(str(tmp_path / "mine" / "x.txt"), "x")
    assert _mode(tmp_path / "mine") == 0o700 and _mode(tmp_path / "mine" / "x.txt") == 0o644


@pytest.mark.parametrize("value", ["rw-r--r--", "999", "1777"])
def test_a_bad_vpo_umask_is_refused_by_name(tmp_path, monkeypatch, value):
    monkeypatch.setenv(storage.UMASK_ENV, value)
    with pytest.raises(storage.StorageError, match="VPO_UMASK"):
        storage.write_text(str(tmp_path / "x.txt"), "x")


def test_the_cli_applies_the_umask_to_other_writers(tmp_path, monkeypatch, strict_process_umask):
    """Libraries that write on their own (HF exports, Ray Data parquet) follow the process umask."""
    from vpo_ray import cli

    monkeypatch.setenv(storage.UMASK_ENV, "002")
    assert cli.main(["models", "list"]) == 0
    path = tmp_path / "written_by_a_library.bin"
    path.write_bytes(b"x")
    assert _mode(path) == 0o664


def test_set_modes_publishes_privately_made_files(tmp_path, monkeypatch):
    monkeypatch.delenv(storage.UMASK_ENV, raising=False)
    (tmp_path / "model" / "sub").mkdir(parents=True)
    for name, mode in (("model.safetensors", 0o600), ("sub/run.sh", 0o700)):
        (tmp_path / "model" / name).write_bytes(b"x")
        os.chmod(tmp_path / "model" / name, mode)
    os.chmod(tmp_path / "model" / "sub", 0o700)
    storage.set_modes(str(tmp_path / "model"))
    assert (_mode(tmp_path / "model" / "model.safetensors"), _mode(tmp_path / "model" / "sub" / "run.sh"),
            _mode(tmp_path / "model" / "sub")) == (0o644, 0o755, 0o755)


def test_written_videos_are_readable(tmp_path, monkeypatch, strict_process_umask):
    import numpy as np

    from vpo_ray import video_io

    monkeypatch.delenv(storage.UMASK_ENV, raising=False)
    uri = video_io.write_mp4(np.zeros((4, 16, 16, 3), dtype=np.uint8), str(tmp_path / "videos" / "a.mp4"))
    assert _mode(uri) == 0o644
