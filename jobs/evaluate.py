"""Evaluate prompt sources on text and video.

    ray job submit ... -- python -m jobs.evaluate --config jobs/evaluate.yaml [key=value ...]
"""
import sys

from jobs._entry import run

SUBCOMMAND = ["eval"]  # `vpo eval`


def main(argv=None) -> int:
    return run(SUBCOMMAND, __file__, argv)


if __name__ == "__main__":
    sys.exit(main())
