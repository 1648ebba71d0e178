"""Query ingest (read, validate, clean, parse flags, dedup) and DPO pair rules.

Pure Python + numpy/pyarrow, no Ray import, so Ray Data stages, the CLI and the server
can use them anywhere. `vpo_ray.data.ingest` as an attribute is the function; the module
is sys.modules["vpo_ray.data.ingest"], and `from vpo_ray.data.ingest import X` works as usual.
"""
from vpo_ray.data.ingest import IngestError, IngestResult, Invalid, ingest, parse_query, read_queries, validate_raw
from vpo_ray.data.pairs import build_dpo_set, dominates, text_pairs, video_pairs

__all__ = ["IngestError", "IngestResult", "Invalid", "ingest", "parse_query", "read_queries", "validate_raw",
           "build_dpo_set", "dominates", "text_pairs", "video_pairs"]
