"""`vpo bench llm-stages` as a script: python benchmarks/llm_stages.py --preset tiny --out runs/bench [key=value ...]"""
import sys

from vpo_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "llm-stages", *sys.argv[1:]]))
