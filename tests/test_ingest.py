"""Ingest: flag parsing and cleaning on real-looking queries, validation, readers, dedup."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vpo_ray import schema
from vpo_ray.data.ingest import IngestError, Invalid, ingest, parse_query, read_queries, validate_raw
from vpo_ray.data.minhash import near_duplicates

DATA = Path(__file__).parent / "data"
# The shared 21k-query file sits beside the checkout (../shared), or two up from a worktree.
REAL_QUERIES = next((p / "shared" / "data" / "vpo_sft_queries.json" for p in Path(__file__).resolve().parents
                     if (p / "shared" / "data" / "vpo_sft_queries.json").exists()), Path("/nonexistent"))


def err_rows(res):
    """(row, reason) of each error; the row is named in the message, as a user reads it."""
    return [(int(re.match(r"row (\d+): ", e["error"]).group(1)), e["reason"]) for e in res.errors]

# (raw query, cleaned text, flags that must be set; fields not listed must stay unset)
FLAG_CASES = [
    ("A supernova exploding in outer space -ar 16:9 -motion 2",
     "A supernova exploding in outer space", {"aspect_ratio": "16:9", "motion": 2}),
    ("low angle shot of Flash Gordon -ar 1:1 -fps 24 -camera zoom out",
     "low angle shot of Flash Gordon", {"aspect_ratio": "1:1", "fps": 24, "camera": "zoom out"}),
    ("dog eating donut -gs 19 -neg text -ar 9:16 -seed 3 -motion 3",
     "dog eating donut", {"guidance": 19.0, "negative_prompt": "text", "aspect_ratio": "9:16", "seed": 3, "motion": 3}),
    ("An animated lion ensnared in a net. --ar 16:9 --v 5",
     "An animated lion ensnared in a net.", {"aspect_ratio": "16:9", "extra": {"v": "5"}}),
    ("fisheye lens wide shot | playful pose --ar 16:9 --style raw --s 150 --v 6.0",
     "fisheye lens wide shot | playful pose",
     {"aspect_ratio": "16:9", "extra": {"style": "raw", "s": "150", "v": "6.0"}}),
    ("green leaves grow in the dark long hair. --no face --ar 9:16",
     "green leaves grow in the dark long hair.", {"negative_prompt": "face", "aspect_ratio": "9:16"}),
    ("a bear jumps into a forest lake, black and white, 16 mm, realism, -gs24, -motion 4",
     "a bear jumps into a forest lake, black and white, 16 mm, realism", {"guidance": 24.0, "motion": 4}),
    ("man holding an energy ball, -ar16:9, -hide",
     "man holding an energy ball", {"aspect_ratio": "16:9", "extra": {"hide": True}}),
    ("a man approaches a statue in the lawn, cinematic 4k - ar 16:9 - motion 4",
     "a man approaches a statue in the lawn, cinematic 4k", {"aspect_ratio": "16:9", "motion": 4}),
    ("woman stands in doorway with wind blowing gs 15 ar 9:16 motion 3",
     "woman stands in doorway with wind blowing", {"guidance": 15.0, "aspect_ratio": "9:16", "motion": 3}),
    ("slow motion 2 people walking on a beach", "slow motion 2 people walking on a beach", {}),
    ("a well-known chef in a cold kitchen, -3 degrees outside",
     "a well-known chef in a cold kitchen, -3 degrees outside", {}),
    ("Toy cars on a football field -30fps -realistic lighting -realistic movement",
     "Toy cars on a football field -30fps -realistic lighting -realistic movement", {}),
    ("an aerial view of Paris-NEG sky", "an aerial view of Paris-NEG sky", {}),
    ("prompt:a footage of the tree leaves -seed 3638967", "a footage of the tree leaves", {"seed": 3638967}),
    ("Prompt - a red sports car drifting on wet asphalt", "a red sports car drifting on wet asphalt", {}),
    ("/imagine prompt:A vibrant image of a child reading a Dr. Seuss book. --v 5.1 --ar 16:9",
     "A vibrant image of a child reading a Dr. Seuss book.", {"aspect_ratio": "16:9", "extra": {"v": "5.1"}}),
    ("[a bighorn sheep is climbing on a rock]", "a bighorn sheep is climbing on a rock", {}),
    ("{Jimi Hendrix playing a melting guitar} {prompt}", "Jimi Hendrix playing a melting guitar", {}),
    ("[Scene 2: The Soldier] [Camera shows the soldier advancing cautiously.]",
     "Camera shows the soldier advancing cautiously.", {}),
    ("一只猫在雨中散步，电影感 -ar 16:9", "一只猫在雨中散步，电影感", {"aspect_ratio": "16:9"}),
    ("two wolves 🐺 running in the city -motion 3", "two wolves 🐺 running in the city", {"motion": 3}),
    ('a humorous caricature smoking <img\n    loading="lazy"\n    alt="🚬"\n'
     '    src="https://cdn.jsdelivr.net/x.svg">-ar 9:16',
     "a humorous caricature smoking 🚬", {"aspect_ratio": "9:16"}),
    ("a book&#39;s cover printed &quot;长城&quot; on a desk <strong>4k</strong>",
     'a book\'s cover printed "长城" on a desk 4k', {}),
    ("**spooky hut** in a swamp, see https://example.com/ref.png for the colors",
     "spooky hut in a swamp, see for the colors", {}),
    ("blue sky with clouds  Message: WELCOME (Font: RETRO)",
     "blue sky with clouds", {"extra": {"message": "WELCOME", "font": "RETRO"}}),
    ("In Japan, two friends ride bikes -neg helmets -gs22 -seed 10728677373628774239",
     "In Japan, two friends ride bikes", {"negative_prompt": "helmets", "guidance": 22.0,
                                          "extra": {"seed": "10728677373628774239"}}),
    ("radiating aurora in the sky -gs20 -motion 4 -neg low quality, -neg, blurry, -neg stars,",
     "radiating aurora in the sky", {"guidance": 20.0, "motion": 4, "negative_prompt": "low quality, blurry, stars"}),
    ('streets of the 1970s -neg &quot;humans&quot; -camera rotate clockwise',
     "streets of the 1970s", {"negative_prompt": "humans", "camera": "rotate clockwise"}),
    ("rainy night, a cup of steaming coffee on the table, -zoom in",
     "rainy night, a cup of steaming coffee on the table", {"camera": "zoom in"}),
    ("red pepper on fire, ultrarealist, -m 2 -w 2 -size 60",
     "red pepper on fire, ultrarealist", {"motion": 2, "extra": {"w": "2", "size": "60"}}),
    ("young Jon Hamm with a long beard -guidance “color 8k video”",
     "young Jon Hamm with a long beard -guidance “color 8k video”", {}),
    ("detailed, vivid colors, 16K resolution, ar 16:9 , Negative prompt: Blurry",
     "detailed, vivid colors, 16K resolution", {"aspect_ratio": "16:9", "negative_prompt": "Blurry"}),
    ("hyper realistic mountains -motion 2.5 -AS 21:9", "hyper realistic mountains",
     {"aspect_ratio": "21:9", "extra": {"motion": "2.5"}}),
    ("-cinematic, dove of peace flying in the sky --ar 9:16 --motion4",
     "cinematic, dove of peace flying in the sky", {"aspect_ratio": "9:16", "motion": 4}),
    ("slow zoom out - pan slow -gs1-motion1 -ar 1:1",
     "slow zoom out - pan slow", {"guidance": 1.0, "motion": 1, "aspect_ratio": "1:1"}),
]


@pytest.mark.parametrize("raw,text,expected", FLAG_CASES, ids=[c[0][:40] for c in FLAG_CASES])
def test_parse_query_real_looking_cases(raw, text, expected):
    cleaned, flags = parse_query(raw)
    assert cleaned == text
    assert json.loads(flags.to_json()) == expected


def test_only_flags_leaves_no_text_and_ingest_says_so():
    assert parse_query("-ar 16:9 -motion 2")[0] == ""
    res = ingest("mem", rows=[(0, "-ar 16:9 -motion 2")])
    assert res.errors[0]["reason"] == "nothing left after cleaning" and "row 0" in res.errors[0]["error"]


def test_query_id_is_shared_by_case_spacing_punctuation_and_flag_variants():
    rows = list(enumerate(["A cat playing piano", "a  cat playing   PIANO.", "a cat playing piano -ar 16:9 -seed 3",
                           "prompt: A cat playing piano!"]))
    res = ingest("mem", rows=rows)
    assert len(res.queries) == 1 and res.queries[0]["source_row"] == 0
    assert [d["kind"] for d in res.duplicates] == ["exact"] * 3
    assert {d["duplicate_of"] for d in res.duplicates} == {res.queries[0]["query_id"]}
    assert res.queries[0]["query_id"] == schema.query_id("a cat playing piano")


def test_query_rows_follow_schema():
    res = ingest("mem", rows=[(7, "astronaut riding a horse on mars -camera zoom in -fps 24")])
    q = res.queries[0]
    assert set(q) == set(schema.Query("", "", "").to_row())
    assert q["source_row"] == 7 and q["query"].endswith("-fps 24") and q["text"] == "astronaut riding a horse on mars"
    assert schema.Flags.from_json(q["flags_json"]) == schema.Flags(camera="zoom in", fps=24)


LONG = ("a weary traveler slowly trudging up a steep hill at dusk, leaning heavily on his worn wooden staff, "
        "his tired feet kicking up dust with each determined step towards the unseen summit")


def test_near_duplicates_removed_and_different_queries_kept():
    rows = list(enumerate([
        LONG,
        LONG + ", cinematic",  # one word added: near duplicate of row 0
        "a red fox sleeping under a snowy pine tree while the northern lights ripple across the sky above it",
        "a red fox running across a snowy field at noon while a hawk circles high in the clear blue sky",
    ]))
    res = ingest("mem", rows=rows, near_dup_threshold=0.85)
    assert [q["source_row"] for q in res.queries] == [0, 2, 3]
    (dup,) = res.duplicates
    assert dup["kind"] == "near" and dup["source_row"] == 1 and dup["duplicate_of"] == res.queries[0]["query_id"]
    assert 0.85 <= dup["similarity"] < 1.0


def test_near_duplicate_threshold_above_one_switches_it_off():
    assert near_duplicates([LONG, LONG + ", cinematic"], 1.01) == {}
    assert near_duplicates([LONG, LONG + ", cinematic"], 0.85) == {1: (0, pytest.approx(0.94, abs=0.06))}


def test_near_duplicates_short_and_cjk_text_use_characters():
    texts = ["一只猫在雨中散步的电影镜头", "一只猫在雨中散步的电影镜头啊", "一只狗在海边奔跑"]
    found = near_duplicates(texts, 0.8)
    assert set(found) == {1} and found[1][0] == 0


BAD_ROWS = [
    (None, "missing query (null)"),
    (42, "query is not a string"),
    ({"text": "a cat"}, "query is not a string"),
    ("", "empty query"),
    ("   \n\t ", "empty query"),
    ("a" * 50, "query too long"),
    ("a cat\x00\x01\x02 on a mat", "binary data"),
    ("".join(chr(c) for c in range(1, 31)) + "abc", "binary data"),
    (b"caf\xe9 au lait", "invalid UTF-8"),
    ("a cat \ud800 on a mat", "invalid UTF-8"),
]


@pytest.mark.parametrize("value,reason", BAD_ROWS, ids=[r for _, r in BAD_ROWS])
def test_validate_raw_names_row_and_reason(value, reason):
    got = validate_raw(value, 17, max_chars=40)
    assert isinstance(got, Invalid) and got.reason == reason
    assert got.message.startswith(f"row 17: {reason}")


def test_validate_raw_accepts_text_with_newlines_tabs_emoji_and_utf8_bytes():
    assert validate_raw("a cat\n\tsleeping 🐈", 0, 100) == "a cat\n\tsleeping 🐈"
    assert validate_raw("猫".encode("utf-8"), 0, 100) == "猫"


def test_every_row_ends_in_exactly_one_list():
    raws = [r for r, _ in BAD_ROWS] + ["a cat on a mat", "A cat on a mat.", LONG, LONG + ", cinematic", "-ar 16:9",
                                        "a dog -motion 3"]
    res = ingest("mem", rows=list(enumerate(raws)), max_chars=40)
    assert res.input_count == len(raws) == len(res.queries) + len(res.duplicates) + len(res.errors)
    rows_seen = sorted([q["source_row"] for q in res.queries] + [d["source_row"] for d in res.duplicates]
                       + [row for row, _ in err_rows(res)])
    assert rows_seen == list(range(len(raws)))
    assert all(tuple(e) == schema.ERROR_COLUMNS and e["stage"] == "ingest" and e["query_id"] for e in res.errors)
    assert len({e["query_id"] for e in res.errors}) == len(res.errors)  # rows without text still get distinct ids


def test_limit_takes_a_seeded_sample_in_source_order():
    rows = [(i, f"query number {i} about a different animal {i}") for i in range(50)]
    a = ingest("mem", rows=rows, limit=10, seed=3)
    b = ingest("mem", rows=rows, limit=10, seed=3)
    c = ingest("mem", rows=rows, limit=10, seed=4)
    picked = [q["source_row"] for q in a.queries]
    assert picked == [q["source_row"] for q in b.queries] == sorted(picked)
    assert picked != [q["source_row"] for q in c.queries] and picked != list(range(10))
    assert a.input_count == 10 and a.source_count == 50


# ----------------------------------------------------------------------------- readers

def test_json_list_of_strings():
    rows = read_queries(str(DATA / "queries_strings.json"))
    assert [r for r, _ in rows] == [0, 1, 2, 3, 4]
    res = ingest(str(DATA / "queries_strings.json"))
    assert [q["text"] for q in res.queries] == ["a cat playing piano", "a footage of the tree leaves", "一只猫在雨中散步"]
    assert [(d["source_row"], d["kind"]) for d in res.duplicates] == [(4, "exact")]
    assert err_rows(res) == [(2, "empty query")]


def test_json_list_of_objects_with_column():
    res = ingest(str(DATA / "queries_objects.json"), column="query")
    assert [q["source_row"] for q in res.queries] == [0, 1]
    assert json.loads(res.queries[1]["flags_json"]) == {"fps": 24, "negative_prompt": "blurry, text"}
    assert err_rows(res) == [(2, "object has no 'query' field"), (3, "query is not a string")]
    assert res.errors[0]["error"].startswith("row 2: object has no 'query' field (fields: id, prompt)")


def test_jsonl_strings_objects_blank_and_bad_lines():
    res = ingest(str(DATA / "queries.jsonl"))
    assert [q["source_row"] for q in res.queries] == [0, 1, 4]  # row = line number; line 2 is blank
    assert res.queries[0]["text"] == "a red panda having fun"
    (err,) = res.errors
    assert err_rows(res) == [(3, "invalid JSON line")] and "line 4" in err["error"]
    assert res.input_count == 4


def test_csv_column_quoted_newlines_and_empty_cell():
    res = ingest(str(DATA / "queries.csv"), column="query")
    assert [q["text"] for q in res.queries] == ["lobsters in a tank, vhs footage",
                                                "a lighthouse in a storm waves crashing", "仙侠 couple under the stars"]
    assert err_rows(res) == [(2, "empty query")]


def test_parquet_round_trip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "q.parquet"
    pq.write_table(pa.table({"query": ["a cat -ar 16:9", None, "a dog -motion 3"], "n": [1, 2, 3]}), path)
    res = ingest(str(path))
    assert [q["text"] for q in res.queries] == ["a cat", "a dog"]
    assert err_rows(res) == [(1, "missing query (null)")]
    with pytest.raises(IngestError, match=r"q\.parquet: no column 'prompt' \(columns: query, n\)"):
        read_queries(str(path), column="prompt")


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(["a cat on a mat"]).encode())
    assert read_queries(str(path)) == [(0, "a cat on a mat")]


@pytest.mark.parametrize("name,content,match", [
    ("missing.json", None, r"missing\.json: file not found"),
    ("object.json", b'{"query": "a cat"}', r"object\.json: JSON top level is dict, expected a list"),
    ("broken.json", b'["a cat", ', r"broken\.json: invalid JSON at line 1"),
    ("latin1.json", '["café au lait"]'.encode("latin-1"), r"latin1\.json: not valid UTF-8 \(byte 5, line 1"),
    ("utf16.jsonl", '"a cat"\n'.encode("utf-16-le"), r"utf16\.jsonl: not UTF-8 text \(NUL byte"),
    ("wrong.csv", b"id,prompt\n1,a cat\n", r"wrong\.csv: no column 'query' \(columns: id, prompt\)"),
    ("wrong.json", b'[{"prompt": "a cat"}, {"prompt": "a dog"}]', r"wrong\.json: no 'query' field in any record"),
    ("queries.txt", b"a cat\n", r"queries\.txt: unknown format '\.txt'"),
    ("fake.parquet", b"not parquet at all", r"fake\.parquet: not a readable parquet file"),
])
def test_unreadable_sources_raise_ingest_error_naming_path(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(IngestError, match=match):
        ingest(str(path))


def test_hf_dataset_offline_names_the_dataset(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(IngestError, match=r"Hugging Face dataset 'vpo-test/no-such-queries' split 'test'"):
        read_queries("hf://vpo-test/no-such-queries:test")


@pytest.mark.skipif(not REAL_QUERIES.exists(), reason="shared VPO query file not present")
def test_real_queries_ingest_without_raising_and_accounts_for_every_row():
    res = ingest(str(REAL_QUERIES))
    assert res.input_count == len(json.loads(REAL_QUERIES.read_text())) > 10_000
    assert res.input_count == len(res.queries) + len(res.duplicates) + len(res.errors)
    assert len({q["query_id"] for q in res.queries}) == len(res.queries)
    assert all(q["text"].strip() for q in res.queries)
