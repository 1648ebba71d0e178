"""Entry points for `ray job submit`: one thin module per job, each with its YAML beside it.

Run one as `python -m jobs.<name> --config jobs/<name>.yaml [key=value ...]`; see README.md.
"""
