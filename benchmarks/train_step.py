"""`vpo bench train-step` as a script: python benchmarks/train_step.py --preset tiny --out runs/bench [key=value ...]"""
import sys

from vpo_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "train-step", *sys.argv[1:]]))
