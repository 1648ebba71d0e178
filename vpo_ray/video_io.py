"""Write generated clips as mp4 and read frames back for the video judge.

`write_mp4` encodes H.264 (yuv420p, the format every player takes) with the ffmpeg that
imageio-ffmpeg ships, into a temp file that is renamed into place (or uploaded whole to
an fsspec URI), so a crash never leaves a half-written video. `read_frames` samples
frames uniformly with decord. A missing, empty, truncated or non-video file raises
`VideoIOError` naming the path: an ISO-BMFF (mp4/mov) file is checked box by box before
decord sees it, because a cut-off mp4 is the common failure (a killed writer, a partial
copy) and the container walk names it precisely.
"""
from __future__ import annotations

import os
import struct
import tempfile
from typing import Any, Optional

import numpy as np

from vpo_ray import storage

# libx264 constant-rate factor: 18 is visually lossless for generated clips, still small.
DEFAULT_CRF = 18


class VideoIOError(OSError):
    """A video could not be written or read; the message names the path and why."""


# ---------------------------------------------------------------------------- frames

def as_uint8_frames(frames: Any) -> np.ndarray:
    """T×H×W×3 uint8 from a uint8/float array (float in [0, 1]), a list of arrays or PIL images."""
    if isinstance(frames, np.ndarray):
        arr = frames
    elif hasattr(frames, "detach"):  # a torch tensor
        arr = frames.detach().cpu().float().numpy()
    else:
        items = list(frames)
        if not items:
            raise VideoIOError("no frames to write")
        arr = np.stack([np.asarray(f.convert("RGB")) if hasattr(f, "convert") else np.asarray(f) for f in items])
    if arr.ndim == 3:  # grayscale T×H×W
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 4 or arr.shape[-1] not in (3, 4):
        raise VideoIOError(f"frames must be T×H×W×3, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise VideoIOError("no frames to write")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating):
            arr = np.nan_to_num(arr, nan=0.0)
            arr = np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8)
        else:
            arr = np.clip(arr, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _pad_even(arr: np.ndarray) -> np.ndarray:
    """yuv420p needs even sides: repeat the last row/column where a side is odd."""
    _, h, w, _ = arr.shape
    if h % 2 == 0 and w % 2 == 0:
        return arr
    return np.ascontiguousarray(np.pad(arr, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge"))


def _encode(frames: np.ndarray, path: str, fps: float, crf: int) -> None:
    import imageio_ffmpeg

    t, h, w, _ = frames.shape
    writer = imageio_ffmpeg.write_frames(
        path, (w, h), fps=fps, codec="libx264", pix_fmt_in="rgb24", pix_fmt_out="yuv420p",
        macro_block_size=1, quality=None, ffmpeg_log_level="error",
        # faststart puts the index (moov) first: players and decord open it without a seek to the end
        output_params=["-crf", str(crf), "-movflags", "+faststart", "-f", "mp4"])
    writer.send(None)
    try:
        for frame in frames:
            writer.send(frame)
    finally:
        writer.close()


def write_mp4(frames: Any, uri: str, fps: float = 8, crf: int = DEFAULT_CRF) -> str:
    """Encode `frames` as H.264 mp4 at `uri` (local path or fsspec URI); returns `uri`.

    Odd heights/widths are padded by one edge pixel (yuv420p needs even sides), so the
    file may be one pixel larger than the frames.
    """
    arr = _pad_even(as_uint8_frames(frames))
    if not fps or fps <= 0:
        raise VideoIOError(f"cannot write {uri}: fps must be positive, got {fps}")
    local = storage.is_local(uri)
    target = storage.local_path(uri) if local else None
    tmp_dir = (os.path.dirname(target) or ".") if local else None
    try:
        if tmp_dir:
            os.makedirs(tmp_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=storage.TMP_PREFIX, suffix=".mp4")
        os.close(fd)
    except OSError as e:
        raise VideoIOError(f"cannot write {uri}: {e.strerror or e}") from e
    try:
        _encode(arr, tmp, fps, crf)
        if local:
            storage.set_modes(tmp)  # mkstemp made it 0600; readers of the run folder need it
            os.replace(tmp, target)
        else:
            with open(tmp, "rb") as f:
                storage.write_bytes(uri, f.read())
    except (OSError, RuntimeError) as e:
        raise VideoIOError(f"cannot write {uri}: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return uri


# ---------------------------------------------------------------------------- reading

_ISO_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"uuid", b"meta", b"moof",
              b"mfra", b"styp", b"sidx", b"pdin", b"prft", b"emsg"}


def _check_container(path: str, shown: str) -> None:
    """Cheap structural check before decoding: empty files and cut-off mp4/mov files."""
    size = os.path.getsize(path)
    if size == 0:
        raise VideoIOError(f"{shown} is not a readable video: empty file")
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 8 or head[4:8] not in _ISO_BOXES:
            return  # not ISO-BMFF (webm, avi, ...): decord decides
        offset, has_moov = 0, False
        while offset < size:
            f.seek(offset)
            hdr = f.read(8)
            if len(hdr) < 8:
                raise VideoIOError(f"{shown} is not a readable video: truncated mp4 (partial box header)")
            box_size, box_type = struct.unpack(">I4s", hdr)
            if box_size == 1:
                ext = f.read(8)
                if len(ext) < 8:
                    raise VideoIOError(f"{shown} is not a readable video: truncated mp4 (partial box header)")
                box_size = struct.unpack(">Q", ext)[0]
            elif box_size == 0:  # box runs to the end of the file
                box_size = size - offset
            if box_size < 8:
                raise VideoIOError(f"{shown} is not a readable video: corrupt mp4 box {box_type!r}")
            if offset + box_size > size:
                raise VideoIOError(f"{shown} is not a readable video: truncated mp4 "
                                   f"({box_type.decode('latin-1')} box needs {offset + box_size} bytes, file has {size})")
            has_moov = has_moov or box_type == b"moov"
            offset += box_size
        if not has_moov:
            raise VideoIOError(f"{shown} is not a readable video: mp4 without an index (no moov box)")


class _LocalCopy:
    """A local path for `uri`: the file itself, or a downloaded temp copy of a remote one."""

    def __init__(self, uri: str):
        self.uri, self.tmp = uri, None

    def __enter__(self) -> str:
        if storage.is_local(self.uri):
            path = storage.local_path(self.uri)
            if not os.path.isfile(path):
                raise VideoIOError(f"video not found: {self.uri}")
            return path
        try:
            data = storage.read_bytes(self.uri)
        except storage.StorageError as e:
            if "not found" in str(e):
                raise VideoIOError(f"video not found: {self.uri}") from None
            raise VideoIOError(f"cannot read video {self.uri}: {e}") from e
        fd, self.tmp = tempfile.mkstemp(prefix="vpo-video-", suffix=".mp4")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return self.tmp

    def __exit__(self, *exc) -> bool:
        if self.tmp and os.path.exists(self.tmp):
            os.unlink(self.tmp)
        return False


def _open(path: str, shown: str):
    import decord

    decord.logging.set_level(decord.logging.QUIET)
    _check_container(path, shown)
    try:
        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        n = len(vr)
    except (RuntimeError, decord.DECORDError) as e:
        raise VideoIOError(f"{shown} is not a readable video: {_first_line(e)}") from None
    if n <= 0:
        raise VideoIOError(f"{shown} is not a readable video: no frames")
    return vr, n


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def sample_indices(total: int, num_frames: Optional[int]) -> list[int]:
    """`num_frames` indices spread evenly over [0, total) including both ends; None = all.

    Asking for more frames than the video has repeats frames, so the count is always met.
    """
    if num_frames is None:
        return list(range(total))
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if num_frames == 1:
        return [0]
    return [int(round(i)) for i in np.linspace(0, total - 1, num_frames)]


def _fix_rows(frame: np.ndarray) -> np.ndarray:
    """Undo decord's row-padding bug: for some widths (16, 48, ...) it returns H×W×C' with
    C' = padded linesize // W instead of H×W×3; the first W*3 bytes of each row are the pixels."""
    if frame.shape[-1] == 3:
        return frame
    h, w = frame.shape[:2]
    return np.ascontiguousarray(frame.reshape(h, -1)[:, : w * 3].reshape(h, w, 3))


def read_frames(uri: str, num_frames: Optional[int] = None) -> np.ndarray:
    """Frames of the video at `uri` as N×H×W×3 uint8, `num_frames` sampled uniformly (None = all)."""
    import decord

    with _LocalCopy(uri) as path:
        vr, n = _open(path, uri)
        idx = sample_indices(n, num_frames)
        try:
            batch = vr.get_batch(idx).asnumpy()
            if batch.shape[-1] == 3:
                return batch
        except (RuntimeError, decord.DECORDError) as e:
            if "DECORDArrayCopyFromTo" not in str(e):  # the row-padding bug; anything else is a bad file
                raise VideoIOError(f"{uri} is not a readable video: {_first_line(e)}") from None
        try:
            return np.stack([_fix_rows(vr[i].asnumpy()) for i in idx])
        except (RuntimeError, decord.DECORDError) as e:
            raise VideoIOError(f"{uri} is not a readable video: {_first_line(e)}") from None


def video_info(uri: str) -> dict:
    """{"frames", "fps", "height", "width"} of the video at `uri` (decodes one frame)."""
    import decord

    with _LocalCopy(uri) as path:
        vr, n = _open(path, uri)
        try:
            h, w = vr[0].shape[:2]
        except (RuntimeError, decord.DECORDError) as e:
            raise VideoIOError(f"{uri} is not a readable video: {_first_line(e)}") from None
        return {"frames": n, "fps": float(vr.get_avg_fps()), "height": int(h), "width": int(w)}


__all__ = ["VideoIOError", "write_mp4", "read_frames", "video_info", "as_uint8_frames", "sample_indices"]
