"""mp4 writing and frame reading: round trips, sampling, and every way a file can be bad."""
from __future__ import annotations

import os

import numpy as np
import pytest

from vpo_ray.video_io import VideoIOError, read_frames, sample_indices, video_info, write_mp4


def gradient_clip(t: int = 9, h: int = 32, w: int = 48) -> np.ndarray:
    """Smooth frames (codec friendly) whose brightness encodes the frame index."""
    x = np.linspace(0, 60, w)[None, :, None]
    y = np.linspace(0, 40, h)[:, None, None]
    frames = np.stack([np.broadcast_to(40 + 15 * i + x + y, (h, w, 1)).repeat(3, axis=2) for i in range(t)])
    frames[..., 1] *= 0.8  # some colour, so a channel swap would show
    return frames.astype(np.uint8)


def test_round_trip_keeps_count_size_fps_and_pixels(tmp_path):
    frames = gradient_clip()
    uri = str(tmp_path / "clip.mp4")
    assert write_mp4(frames, uri, fps=8) == uri
    assert video_info(uri) == {"frames": 9, "fps": 8.0, "height": 32, "width": 48}
    back = read_frames(uri)
    assert back.shape == frames.shape and back.dtype == np.uint8
    err = np.abs(back.astype(int) - frames.astype(int))
    assert err.mean() < 3 and np.percentile(err, 99) < 12  # lossy H.264 at crf 18 on smooth frames
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


@pytest.mark.parametrize("width", [16, 48])
def test_widths_decord_pads_internally_still_read_correctly(tmp_path, width):
    # decord returns H×W×4 or ×6 for these widths (padded rows); read_frames undoes that
    frames = gradient_clip(t=3, h=32, w=width)
    uri = str(tmp_path / "w.mp4")
    write_mp4(frames, uri, fps=8)
    for back in (read_frames(uri), read_frames(uri, 2)):
        assert back.shape[1:] == (32, width, 3)
    assert np.abs(read_frames(uri).astype(int) - frames.astype(int)).mean() < 3


def test_float_frames_and_pil_images_write_the_same_video(tmp_path):
    from PIL import Image

    frames = gradient_clip(t=5)
    write_mp4(frames.astype(np.float32) / 255.0, str(tmp_path / "f.mp4"), fps=4)
    write_mp4([Image.fromarray(f) for f in frames], str(tmp_path / "p.mp4"), fps=4)
    a, b = read_frames(str(tmp_path / "f.mp4")), read_frames(str(tmp_path / "p.mp4"))
    assert a.shape == b.shape == (5, 32, 48, 3)
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 1.5


def test_odd_sizes_are_padded_to_even(tmp_path):
    frames = gradient_clip(t=3, h=33, w=31)
    uri = str(tmp_path / "odd.mp4")
    write_mp4(frames, uri, fps=8)
    info = video_info(uri)
    assert (info["height"], info["width"]) == (34, 32)
    back = read_frames(uri)
    assert np.abs(back[:, :33, :31].astype(int) - frames.astype(int)).mean() < 3


def test_sampling_picks_evenly_spaced_frames(tmp_path):
    frames = gradient_clip(t=9)
    uri = str(tmp_path / "s.mp4")
    write_mp4(frames, uri, fps=8)
    assert sample_indices(9, 4) == [0, 3, 5, 8]
    got = read_frames(uri, num_frames=4)
    assert got.shape == (4, 32, 48, 3)
    want = frames[[0, 3, 5, 8]]
    assert np.abs(got.astype(int) - want.astype(int)).mean() < 3
    assert read_frames(uri, num_frames=1).shape[0] == 1
    assert read_frames(uri, num_frames=12).shape[0] == 12  # fewer frames than asked: repeats, count kept
    with pytest.raises(ValueError):
        read_frames(uri, num_frames=0)


def test_overwrite_replaces_the_whole_file(tmp_path):
    uri = str(tmp_path / "v.mp4")
    write_mp4(gradient_clip(t=9), uri, fps=8)
    write_mp4(gradient_clip(t=3), uri, fps=8)
    assert video_info(uri)["frames"] == 3


def test_fsspec_uri_round_trip():
    uri = "memory://vpo-tests/videos/clip.mp4"
    write_mp4(gradient_clip(t=5), uri, fps=8)
    assert video_info(uri)["frames"] == 5
    assert read_frames(uri, 2).shape == (2, 32, 48, 3)


def test_bad_frames_or_fps_raise_and_leave_no_file(tmp_path):
    uri = str(tmp_path / "bad.mp4")
    with pytest.raises(VideoIOError, match="T×H×W×3"):
        write_mp4(np.zeros((4, 8, 8, 5), np.uint8), uri, fps=8)
    with pytest.raises(VideoIOError, match="no frames"):
        write_mp4([], uri, fps=8)
    with pytest.raises(VideoIOError, match="fps"):
        write_mp4(gradient_clip(t=2), uri, fps=0)
    assert os.listdir(tmp_path) == []


def test_missing_file_says_not_found(tmp_path):
    uri = str(tmp_path / "nope.mp4")
    for fn in (read_frames, video_info):
        with pytest.raises(VideoIOError, match="not found") as ei:
            fn(uri)
        assert uri in str(ei.value)
    with pytest.raises(VideoIOError, match="not found"):
        read_frames("memory://vpo-tests/missing.mp4")


def _corrupt_files(tmp_path) -> dict:
    good = str(tmp_path / "good.mp4")
    write_mp4(gradient_clip(t=9), good, fps=8)
    data = open(good, "rb").read()
    files = {
        "random bytes": np.random.RandomState(0).bytes(4096),
        "truncated mp4 (half)": data[: len(data) // 2],
        "truncated mp4 (90%)": data[: int(len(data) * 0.9)],
        "mp4 header only": data[:40],
        "empty file": b"",
        "text named .mp4": b"this is not a video\n",
    }
    out = {}
    for i, (name, blob) in enumerate(files.items()):
        path = tmp_path / f"bad{i}.mp4"
        path.write_bytes(blob)
        out[name] = str(path)
    return out


def test_corrupt_files_raise_video_io_error_naming_the_path(tmp_path):
    for name, path in _corrupt_files(tmp_path).items():
        for fn in (read_frames, video_info):
            with pytest.raises(VideoIOError) as ei:
                fn(path)
            msg = str(ei.value)
            assert path in msg and "not a readable video" in msg, (name, msg)
