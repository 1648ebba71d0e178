#!/usr/bin/env python3
"""Stand-in `ffmpeg` for a GPU box that has none (IMAGEIO_FFMPEG_EXE points here; gpu_run.sh sets it).

Implements only what imageio-ffmpeg's `write_frames` asks of ffmpeg: raw rgb24 frames of
`-s WxH` at `-r FPS` on stdin, one output path last. It writes MPEG-4 Part 2 ('mp4v') in an
mp4 container through OpenCV, which the GPU image ships, instead of H.264 through libx264, so
encode times measured with it are OpenCV's, not x264's; decord reads the result.
"""
import os
import sys
from fractions import Fraction

import cv2
import numpy as np


def main(args: list[str]) -> int:
    if "-version" in args:
        print("ffmpeg version 0-shim (OpenCV mp4v writer, vpo_ray benchmarks/ffmpeg_shim.py)")
        return 0
    width, height = (int(x) for x in args[args.index("-s") + 1].split("x"))
    fps = float(Fraction(args[args.index("-r") + 1]))
    out = args[-1]
    tmp = out + ".shim.mp4"  # OpenCV picks the container from the extension
    writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        print(f"ffmpeg_shim: OpenCV cannot write {tmp}", file=sys.stderr)
        return 1
    size = width * height * 3
    stdin = sys.stdin.buffer
    while True:
        data = stdin.read(size)
        if len(data) < size:
            break
        frame = np.frombuffer(data, np.uint8).reshape(height, width, 3)
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
