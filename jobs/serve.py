"""Deploy the optimizer as a Ray Serve application.

    ray job submit ... -- python -m jobs.serve --config jobs/serve.yaml [key=value ...]
"""
import sys

from jobs._entry import run

SUBCOMMAND = ["serve"]  # `vpo serve`


def main(argv=None) -> int:
    return run(SUBCOMMAND, __file__, argv)


if __name__ == "__main__":
    sys.exit(main())
