"""`vpo bench video-dpo-step` as a script: python benchmarks/video_dpo_step.py --preset tiny --out runs/bench [key=value ...]"""
import sys

from vpo_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "video-dpo-step", *sys.argv[1:]]))
