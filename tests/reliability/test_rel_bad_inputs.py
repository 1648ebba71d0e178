"""Bad input at the CLI: flags and overrides, YAML configs, query files, model ids.

Each case runs `vpo ...` in-process (vpo_ray.cli.main) and expects what a user should see:
exit code 2 (1 for `vpo models check`, whose job is to say no), an error on stderr that
names the field, file, row or id at fault, and no traceback. Query files whose rows are
bad (rather than the whole file) are a documented safe handling: the run succeeds and
every bad row is an error row that names it, so no row is lost. Ray is never started
here: a case that would reach it fails instead.
"""
from __future__ import annotations

import json
import os

import pytest

from relsupport import read_jsonl

pytestmark = pytest.mark.timeout(120)

GOOD_QUERIES = ["a cat playing piano in a jazz bar", "drone shot of waves on a black sand beach"]


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Bad input must be refused before any Ray work: starting Ray here is a failure."""
    import vpo_ray.ray_utils as ru

    def refuse(*a, **k):
        raise AssertionError("the command reached init_ray: the bad input was not caught up front")

    monkeypatch.setattr(ru, "init_ray", refuse)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_inputs")
    good = d / "good.json"
    good.write_text(json.dumps(GOOD_QUERIES))
    return d


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of `vpo argv`; SystemExit (argparse) counts as its code."""
    from vpo_ray.cli import main

    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 2
    out, err = capsys.readouterr()
    return rc, out, err


def assert_clear_error(rc, err, names, codes=(2,)):
    assert "Traceback" not in err, f"traceback shown to the user:\n{err[-1500:]}"
    assert rc in codes, f"exit code {rc}, expected {codes}; stderr: {err[-500:]}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines, "no error message on stderr"
    # our own errors are one line; argparse's are its usage lines, then one `error:` line
    msg = lines[-1]
    if not msg.startswith("usage:") and "error:" not in msg:
        assert len(lines) == 1, f"error is not one line:\n{err}"
    for name in names:
        assert name.lower() in msg.lower(), f"error does not name {name!r}: {msg}"


# ---------------------------------------------------------------------------- CLI flags and overrides

def _gen(files, *extra):
    return ["generate", "sft", "--queries", files / "good.json", "--out", files / "out", *extra]


CLI_CASES = [
    # (id, argv builder, words the error must name)
    ("no kind", lambda f: ["generate"], ["kind"]),
    ("unknown kind", lambda f: ["generate", "ppo", "--queries", f / "good.json"], ["ppo"]),
    ("no queries", lambda f: ["generate", "sft", "--out", f / "out"], ["queries"]),
    ("unknown flag", lambda f: _gen(f, "--bogus"), ["--bogus"]),
    ("unknown command", lambda f: ["frobnicate"], ["frobnicate"]),
    ("word without =", lambda f: _gen(f, "num_samples"), ["num_samples"]),
    ("not an int", lambda f: _gen(f, "num_samples=abc"), ["num_samples"]),
    ("float for int", lambda f: _gen(f, "seed=1.5"), ["seed"]),
    ("unknown key", lambda f: _gen(f, "nosuchkey=1"), ["nosuchkey"]),
    ("unknown nested key", lambda f: _gen(f, "video.nosuch=1"), ["video.nosuch"]),
    ("scalar for section", lambda f: _gen(f, "video=3"), ["video"]),
    ("section path through scalar", lambda f: _gen(f, "seed.x=3"), ["seed"]),
    ("empty key", lambda f: _gen(f, "=5"), ["empty key"]),
    ("bool as word", lambda f: _gen(f, "refine=maybe"), ["refine"]),
    ("zero samples", lambda f: _gen(f, "num_samples=0"), ["num_samples"]),
    ("negative limit", lambda f: _gen(f, "limit=-1"), ["limit"]),
    ("unknown output format", lambda f: _gen(f, "output_format=csv"), ["output_format"]),
    ("top_p out of range", lambda f: _gen(f, "sampling.top_p=1.5"), ["sampling.top_p"]),
    ("negative temperature", lambda f: _gen(f, "judge_sampling.temperature=-1"), ["judge_sampling.temperature"]),
    ("zero batch size", lambda f: _gen(f, "rewrite_stage.batch_size=0"), ["rewrite_stage.batch_size"]),
    ("max < min actors", lambda f: _gen(f, "judge_stage.min_actors=2", "judge_stage.max_actors=1"),
     ["judge_stage.max_actors"]),
    ("zero frames", lambda f: _gen(f, "video.num_frames=0"), ["video.num_frames"]),
    ("judge url not http", lambda f: _gen(f, "judge_endpoint.base_url=ftp://127.0.0.1/x"), ["judge_endpoint.base_url"]),
    ("negative retries", lambda f: _gen(f, "judge_endpoint.max_retries=-1"), ["judge_endpoint.max_retries"]),
    ("zero dedup threshold", lambda f: _gen(f, "near_dup_threshold=0"), ["near_dup_threshold"]),
    ("list for string", lambda f: _gen(f, "query_column=[a,b]"), ["query_column"]),
    ("checklist not a name", lambda f: _gen(f, "checklist=5"), ["checklist"]),
    ("ray cpus as word", lambda f: _gen(f, "ray.num_cpus=two"), ["ray.num_cpus"]),
    ("missing config file", lambda f: _gen(f, "--config", f / "nope.yaml"), ["nope.yaml"]),
    ("unknown preset", lambda f: _gen(f, "--preset", "nosuchpreset"), ["nosuchpreset"]),
    ("serve port not a number", lambda f: ["serve", "--port", "eighty"], ["--port"]),
    ("eval empty sources", lambda f: ["eval", "--out", f / "ev", "sources=[]"], ["sources"]),
    ("models without action", lambda f: ["models"], ["models"]),
    ("models build unknown preset", lambda f: ["models", "build", "--preset", "nosuch"], ["nosuch"]),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_flag_errors(case, files, capsys, rel):
    name, argv, names = case
    rel("bad_input", "CLI args", name)
    rc, _, err = run_cli(argv(files), capsys)
    assert_clear_error(rc, err, names)


# ---------------------------------------------------------------------------- YAML configs

def _yaml_cases():
    lol = "a: &a ['lol','lol','lol','lol','lol','lol','lol','lol','lol']\n"
    for i, c in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        lol += f"{c}: &{c} [" + ",".join([f"*{prev}"] * 9) + "]\n"
    deep = "x:\n" + "".join("  " * (i + 1) + f"x{i}:\n" for i in range(200)) + "  " * 201 + "1\n"
    return [
        ("invalid syntax", "num_samples: [1, 2\n", ["not valid YAML"]),
        ("top-level list", "- num_samples: 2\n", ["mapping"]),
        ("top-level scalar", "just words\n", ["mapping"]),
        ("unknown key", "num_sample: 2\n", ["num_sample"]),
        ("wrong type", "num_samples: two\n", ["num_samples"]),
        ("nested wrong type", "video:\n  num_frames: many\n", ["video.num_frames"]),
        ("scalar for a section", "video: 5\n", ["video"]),
        ("list for a section", "sampling: [1, 2]\n", ["sampling"]),
        ("bool for number", "pair_margin: yes\n", ["pair_margin"]),
        ("null for int", "max_pairs_per_query: null\n", ["max_pairs_per_query"]),
        ("checklist file missing", "checklist: no_such_checklist.yaml\n", ["checklist", "no_such_checklist.yaml"]),
        ("checklist inline list", "checklist:\n  - id: a\n", ["checklist"]),
        ("python object tag", "!!python/object/apply:os.system ['touch PWNED_MARKER']\n", ["not valid YAML"]),
        ("python name tag", "seed: !!python/name:os.system\n", ["not valid YAML"]),
        ("tabs for indent", "video:\n\tnum_frames: 9\n", ["not valid YAML"]),
        ("billion laughs", lol, ["unknown config key"]),
        ("deeply nested unknown", deep, ["'x'"]),
        ("output format out of range", "output_format: csv\n", ["output_format"]),
        ("huge file of unknown keys", "".join(f"k{i}: {i}\n" for i in range(20000)), ["unknown config key"]),
    ]


YAML_CASES = _yaml_cases()


def _case_id(c):
    return c.values[0] if hasattr(c, "values") else c[0]


@pytest.mark.parametrize("name,text,names", YAML_CASES, ids=[_case_id(c) for c in YAML_CASES])
def test_yaml_config_errors(name, text, names, files, capsys, rel, tmp_path, monkeypatch):
    rel("bad_input", "YAML configs", name)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    monkeypatch.chdir(tmp_path)  # where a python tag payload would drop its marker
    rc, _, err = run_cli(_gen(files, "--config", cfg), capsys)
    assert_clear_error(rc, err, names)
    assert not (tmp_path / "PWNED_MARKER").exists(), "a YAML tag executed code"


@pytest.mark.parametrize("kind", ["binary bytes", "latin-1 text", "a directory"])
def test_unreadable_config_file_is_a_clear_error(kind, files, capsys, rel, tmp_path):
    rel("bad_input", "YAML configs", f"config file is {kind}")
    cfg = tmp_path / "cfg.yaml"
    if kind == "binary bytes":
        cfg.write_bytes(bytes(range(256)) * 4)
    elif kind == "latin-1 text":
        cfg.write_bytes("query_column: caf\xe9\n".encode("latin-1"))
    else:
        cfg.mkdir()
    rc, _, err = run_cli(_gen(files, "--config", cfg), capsys)
    assert_clear_error(rc, err, ["cfg.yaml"])


def test_empty_config_means_defaults(files, capsys, rel, tmp_path):
    """Documented: an empty YAML file is an empty mapping (all defaults); the next error is the real one."""
    rel("bad_input", "YAML configs", "empty file (defaults)")
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("")
    rc, _, err = run_cli(["generate", "sft", "--config", cfg, "--out", tmp_path / "o"], capsys)
    assert_clear_error(rc, err, ["queries"])


# ---------------------------------------------------------------------------- query files (whole file unusable)

def _deep(n):
    return "[" * n + "]" * n


FILE_CASES = [
    # (id, file name, bytes, words the error must name besides the path)
    ("empty .json", "q.json", b"", ["invalid JSON"]),
    ("whitespace .json", "q.json", b"  \n\n ", ["invalid JSON"]),
    ("json object", "q.json", b'{"query": "a cat"}', ["expected a list"]),
    ("json string", "q.json", b'"a cat"', ["expected a list"]),
    ("json number", "q.json", b"42", ["expected a list"]),
    ("json null", "q.json", b"null", ["expected a list"]),
    ("truncated json", "q.json", b'["a cat", "a d', ["invalid JSON"]),
    ("deeply nested json", "q.json", _deep(100000).encode(), ["nested too deeply"]),
    ("binary", "q.json", bytes(range(256)) * 64, ["not UTF-8"]),
    ("latin-1", "q.jsonl", '{"query": "caf\xe9 au lait"}\n'.encode("latin-1"), ["not valid UTF-8"]),
    ("utf-16 without BOM", "q.json", '["a cat"]'.encode("utf-16-le"), ["NUL"]),
    ("wrong column (jsonl)", "q.jsonl", b'{"text": "a cat"}\n{"text": "a dog"}\n', ["no 'query' field"]),
    ("wrong column (json)", "q.json", b'[{"prompt": "a cat"}]', ["no 'query' field"]),
    ("csv without the column", "q.csv", b"text,id\na cat,1\n", ["no column 'query'"]),
    ("empty csv", "q.csv", b"", ["empty CSV"]),
    ("csv with NUL", "q.csv", b"query\na \x00cat\n", ["NUL"]),
    ("parquet that is text", "q.parquet", b"query\na cat\n", ["not a readable parquet"]),
    ("unknown extension", "q.txt", b"a cat\n", ["unknown format"]),
    ("no extension", "queries", b"a cat\n", ["unknown format"]),
]


@pytest.mark.parametrize("case", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_unusable_query_file(case, capsys, rel, tmp_path):
    name, fname, data, names = case
    rel("bad_input", "query files", name)
    q = tmp_path / fname
    q.write_bytes(data)
    out = tmp_path / "out"
    rc, _, err = run_cli(["generate", "sft", "--queries", q, "--out", out], capsys)
    assert_clear_error(rc, err, [fname, *names])
    assert not (out / "sft.parquet").exists()


def test_parquet_without_the_column(capsys, rel, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rel("bad_input", "query files", "parquet without the column")
    q = tmp_path / "q.parquet"
    pq.write_table(pa.table({"text": ["a cat"]}), q)
    rc, _, err = run_cli(["generate", "sft", "--queries", q, "--out", tmp_path / "o"], capsys)
    assert_clear_error(rc, err, ["q.parquet", "no column 'query'"])


@pytest.mark.parametrize("what", ["missing file", "a directory", "hf:// without a name", "hf:// offline"])
def test_query_source_not_there(what, capsys, rel, tmp_path):
    rel("bad_input", "query files", what)
    src = {"missing file": str(tmp_path / "nope.json"), "a directory": str(tmp_path / "d.json"),
           "hf:// without a name": "hf://", "hf:// offline": "hf://vpo-no-such-org/no-such-set"}[what]
    if what == "a directory":
        os.mkdir(src)
    rc, _, err = run_cli(["generate", "sft", "--queries", src, "--out", tmp_path / "o"], capsys)
    names = {"missing file": ["nope.json", "not found"], "a directory": ["d.json", "directory"],
             "hf:// without a name": ["dataset name"], "hf:// offline": ["no-such-set"]}[what]
    assert_clear_error(rc, err, names)


# ---------------------------------------------------------------------------- query files (bad rows)

HUGE = "a cat " * 2_000_000  # 12 MB in one row

ROW_CASES = [
    # (id, file name, content, row index -> reason word)
    ("non-string rows", "q.json", json.dumps([1, None, [1, 2], True, 2.5, ["a cat"]]), "not a string"),
    ("empty strings", "q.json", json.dumps(["", "   ", "\n\t"]), "empty"),
    ("only flags", "q.json", json.dumps(["-ar 16:9", "--neg blur", "-seed 4"]), "nothing left"),
    ("huge row", "q.json", json.dumps([HUGE]), "too long"),
    ("lone surrogates", "q.json", '["a cat \\ud800", "\\udfff dog"]', "invalid UTF-8"),
    ("binary inside strings", "q.json", json.dumps(["\x01\x02\x03\x04\x05\x06\x07\x08\x0b\x0c"]), "binary"),
    ("NUL inside strings", "q.json", json.dumps(["a cat\x00 on a mat"]), "NUL"),
    ("NaN and Infinity", "q.json", "[NaN, Infinity, -Infinity]", "not a string"),
    ("bad jsonl lines", "q.jsonl", '{"query": "a ca\n[1,2\n{"query": 5}\n', "row"),
    ("object rows missing the field", "q.json", json.dumps([{"query": "x" * 0}, {"other": "a dog"}]), "row"),
    ("ragged csv", "q.csv", "id,query\n1\n2\n", "cell"),
    ("deep row", "q.json", "[" + _deep(900) + "]", "not a string"),
]


@pytest.mark.parametrize("case", ROW_CASES, ids=[c[0] for c in ROW_CASES])
def test_bad_rows_become_error_rows(case, capsys, rel, tmp_path):
    """The run finishes (exit 0, nothing to model), every bad row is an error row naming it."""
    name, fname, text, word = case
    rel("bad_input", "query rows", name)
    q = tmp_path / fname
    q.write_text(text, encoding="utf-8", errors="surrogatepass")
    out = tmp_path / "out"
    rc, stdout, err = run_cli(["generate", "sft", "--queries", q, "--out", out], capsys)
    assert "Traceback" not in err
    assert rc == 0, err[-800:]
    summary = json.loads((out / "summary.json").read_text())
    errors = read_jsonl(out / "errors.jsonl")
    assert summary["accounted"] and summary["output_rows"] == 0
    assert summary["input_queries"] == len(errors) + summary["duplicates"] >= 1
    for e in errors:
        assert e["stage"] == "ingest" and e["error"].startswith("row "), e
    assert any(word.lower() in (e["reason"] + e["error"]).lower() for e in errors), errors


def test_mixed_file_keeps_good_rows_and_names_bad_ones(rel, tmp_path):
    """Good rows go on (checked through ingest: no Ray needed), bad ones are error rows."""
    from vpo_ray.data.ingest import ingest

    rel("bad_input", "query rows", "mixed good and bad jsonl")
    q = tmp_path / "q.jsonl"
    lines = [json.dumps({"query": "a cat on a mat"}), "{broken", json.dumps({"query": 7}),
             json.dumps({"query": "a dog in the snow, cinematic"}), json.dumps({"query": ""})]
    q.write_text("\n".join(lines) + "\n")
    res = ingest(str(q))
    assert [x["text"] for x in res.queries] == ["a cat on a mat", "a dog in the snow, cinematic"]
    assert sorted(e["error"].split(":")[0] for e in res.errors) == ["row 1", "row 2", "row 4"]
    assert res.input_count == len(res.queries) + len(res.duplicates) + len(res.errors)


# ---------------------------------------------------------------------------- model ids and paths

@pytest.mark.parametrize("model,names", [
    ("/nonexistent/model", ["/nonexistent/model", "not found"]),
    ("vpo-no-such-org/no-such-model", ["vpo-no-such-org/no-such-model"]),
    ("../../etc/passwd", ["../../etc/passwd"]),
    ("/etc", ["/etc"]),
    ("", ["''"]),
], ids=["missing path", "uncached hub id offline", "relative escape", "not a model dir", "empty id"])
def test_models_check_bad_ids(model, names, capsys, rel):
    rel("bad_input", "model ids", f"models check {model!r}")
    rc, _, err = run_cli(["models", "check", model], capsys)
    assert_clear_error(rc, err, names, codes=(1, 2))


def test_models_check_garbage_config(capsys, rel, tmp_path):
    rel("bad_input", "model ids", "models check: dir with a garbage config.json")
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{not json")
    rc, _, err = run_cli(["models", "check", d], capsys)
    assert_clear_error(rc, err, [str(d)], codes=(1, 2))


@pytest.mark.parametrize("how", ["--optimizer", "optimizer="])
@pytest.mark.parametrize("optimizer", ["/nonexistent", "vpo-no-such-org/no-such-model", "/etc"],
                         ids=["missing path", "uncached hub id", "not a model dir"])
def test_generate_with_a_bad_optimizer(optimizer, how, files, capsys, rel):
    rel("bad_input", "model ids", f"generate {how}{' ' if how.startswith('-') else ''}{optimizer}")
    extra = ["--optimizer", optimizer] if how.startswith("-") else [f"optimizer={optimizer}"]
    rc, _, err = run_cli(_gen(files, *extra), capsys)
    assert_clear_error(rc, err, [optimizer])
