"""`vpo bench pipeline` as a script: python benchmarks/pipeline.py --preset paper --out runs/bench [key=value ...]"""
import sys

from vpo_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "pipeline", *sys.argv[1:]]))
