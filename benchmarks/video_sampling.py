"""`vpo bench video-sampling` as a script: python benchmarks/video_sampling.py --preset tiny --out runs/bench [key=value ...]"""
import sys

from vpo_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "video-sampling", *sys.argv[1:]]))
