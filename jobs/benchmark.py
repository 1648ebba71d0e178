"""Throughput benchmark (video sampling, LLM stages, train step).

    ray job submit ... -- python -m jobs.benchmark --config jobs/benchmark.yaml [key=value ...]
"""
import sys

from jobs._entry import run

SUBCOMMAND = ["bench"]  # `vpo bench NAME`: NAME is the YAML's `name` (or a name=... override)
POSITIONAL = ("name", "video-sampling")


def main(argv=None) -> int:
    return run(SUBCOMMAND, __file__, argv, POSITIONAL)


if __name__ == "__main__":
    sys.exit(main())
