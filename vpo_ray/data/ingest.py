"""Raw user queries in, clean `schema.Query` rows out: read, validate, clean, parse flags, dedup.

`ingest()` accounts for every input row: it ends in exactly one of `queries`,
`duplicates` or `errors` (`input_count == len(queries) + len(duplicates) + len(errors)`).

Cleaning (`parse_query`), in order:
  1. HTML: entities unescaped (`&quot;` `&#39;` ...), `<img alt="🐺">` emoji kept as the
     emoji, every other tag dropped (its inner text kept).
  2. Invisible characters (zero-width space, BOM, bidi marks) and control characters
     other than newline/tab dropped. ZWJ and variation selectors stay (emoji sequences).
  3. Pika's text overlay `Message: X (Font: Y)` -> flags.extra {"message": X, "font": Y}.
  4. Markdown links keep their text, URLs go, `**` `__` `~~` backticks and heading marks go.
  5. Prefixes `prompt:`, `Prompt -`, `/imagine prompt:`, `/imagine`, `/create prompt:` go.
  6. Flags are parsed and removed (grammar below).
  7. Script labels `[Scene 2: ...]`, `[Verse]` and template placeholders `{prompt}` go;
     every other `[...]` / `{...}` is unwrapped (its text is often the whole query), and
     Stable Diffusion weights `((girl:1.5))` become `girl`.
  8. Whitespace collapses to single spaces; separators left behind by removed flags
     (`a, , b`, trailing `,`/`-`) are tidied. Non-ASCII text (CJK, emoji) is never touched.

Flag grammar (conservative: a word only becomes a flag when it cannot be prose):
  * A flag starts at the start of the text or after whitespace / `,;.|([{` (so `well-known`,
    `Paris-NEG` are text), with `-`, `--`, `—` or `–`, then a name starting with a letter
    (so `-3 degrees` is text). Name and value are case-insensitive; a `:`/`=` may follow the name.
  * Known names (aliases -> Flags field): ar/aspect/as -> aspect_ratio (needs `W:H`);
    neg/negative/no/nge/ng -> negative_prompt (text up to the next flag or the end; several
    are joined with ", "; `--no x` counts too; the label `Negative prompt:` also); camera/cam/
    camer/camara -> camera (needs a move: zoom|pan|rotate|tilt|... + directions); `-zoom in`,
    `-pan left`, `-rotate cw` -> camera; motion/m/movement/move -> motion; seed -> seed;
    fps -> fps; gs/guidance/cfg -> guidance. A known name whose value does not parse
    (`-motion high`, `-guidance "color 8k"`) is left in the text.
  * Numeric known flags also parse as `- motion 4` / `-- ar 16:9` (stray space) and
    attached (`-gs24`, `-ar16:9`, `gs-22`). Without a dash, `ar W:H`, `gs N` and `fps N`
    count anywhere (none is prose); `motion N` and `seed N` only at the tail or next to
    other flags (so "slow motion 2 people" stays text).
  * Unknown names: `-word NUMBER` / `--word NUMBER` (`-w 1.5`, `--s 750`, `-v3.0`),
    `--style WORD`, and the switches hide/tile/hd/video/turbo/fast/relax/upbeta/uplight are
    flags kept verbatim in `flags.extra`. Any other `-word ...` (`-cinematic`,
    `-realistic lighting`) is prose and stays.
  * Ints that are not whole numbers go to `extra` as text (Flags.motion is an int), and so
    do seeds >= 2**63 (kept exactly, but not as an int64). A repeated scalar flag: last wins.

Identity and dedup: `query_id` = `schema.query_id(cleaned text)`, so case, spacing, edge
punctuation and flags do not make two queries different (`a cat -ar 16:9` == `A cat`).
Exact duplicates share an id; near duplicates are found with MinHash + LSH (see
`vpo_ray.data.minhash.near_duplicates`). The first occurrence (in source order) is kept.
"""
from __future__ import annotations

import csv
import html
import io
import json
import os
import random
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Union

from vpo_ray import schema, storage
from vpo_ray.data.minhash import near_duplicates
from vpo_ray.schema import Flags


class IngestError(ValueError):
    """A query source cannot be read; the message names the path (and row) and the problem."""


# ============================================================================ cleaning

_FIELD_OF = {
    "ar": "aspect_ratio", "aspect": "aspect_ratio", "as": "aspect_ratio", "aspect_ratio": "aspect_ratio",
    "neg": "negative_prompt", "negative": "negative_prompt", "no": "negative_prompt",
    "nge": "negative_prompt", "ng": "negative_prompt", "negative_prompt": "negative_prompt",
    "camera": "camera", "cam": "camera", "camer": "camera", "camara": "camera", "camra": "camera",
    "motion": "motion", "m": "motion", "movement": "motion", "move": "motion", "mov": "motion",
    "seed": "seed", "seeds": "seed",
    "fps": "fps",
    "gs": "guidance", "guidance": "guidance", "guidance_scale": "guidance", "cfg": "guidance",
}
_KIND = {"aspect_ratio": "ratio", "negative_prompt": "text", "camera": "camera", "motion": "int",
         "seed": "int", "fps": "int", "guidance": "float"}
_CAMERA_MOVES = ("zoom", "pan", "rotate", "tilt")  # `-zoom in` is itself a camera flag
_SWITCHES = {"hide", "tile", "hd", "video", "turbo", "fast", "relax", "upbeta", "uplight"}
_WORD_VALUED = {"style"}  # Midjourney `--style raw`
_DASHLESS_ANYWHERE = {"ar", "gs", "fps"}  # followed by a number these are never prose
_DASHLESS_TAIL = {"motion", "seed"}  # prose can say "slow motion 2 ...": only among flags
_MAX_SEED = 2 ** 63  # larger seeds do not fit int64 columns; kept as text in extra

_BEFORE = r"(?<![^\s,;.(\[{|，。、；])"  # start of text, whitespace or a separator
_DIGIT_BEFORE = r"(?<=\d)"  # `-gs1-motion1`: a known name may follow a value directly
_END = r"(?=$|[^\w.:：]|\.(?!\d))"  # value boundary: `4k`, `16:9x` are not values
_NUM = r"\d{1,24}(?:\.\d+)?"
_SEP = r"[ \t]*[:=]?[ \t]*[\"“'‘]?"  # between name and value: spaces, `:`, `=`, an opening quote
_CLOSE_Q = r"[\"”'’]?"
_DASHED_RE = re.compile(r"(?:" + _BEFORE + "|" + _DIGIT_BEFORE + r")"
                        r"(?P<dash>--|-|—|–)(?P<sp>[ \t]?)(?P<name>[A-Za-z][A-Za-z_]*)")
_DASHLESS_RE = re.compile(_BEFORE + r"(?P<name>ar|gs|fps|motion|seed)(?![A-Za-z])", re.IGNORECASE)
_NEG_LABEL_RE = re.compile(_BEFORE + r"negative\s+prompt\s*:", re.IGNORECASE)
_RATIO_RE = re.compile(_SEP + r"(?P<v>\d{1,4}(?:\.\d+)?[ \t]?[:：][ \t]?\d{1,4}(?:\.\d+)?)" + _CLOSE_Q + _END)
_NUMBER_RE = re.compile(_SEP + r"(?P<v>" + _NUM + r")" + _CLOSE_Q + _END)
_DASHLESS_NUMBER_RE = re.compile(r"[ \t]?[:=\-]?[ \t]?(?P<v>" + _NUM + r")" + _END)
_WORD_RE = re.compile(r"[ \t]+(?P<v>[A-Za-z]+)" + _END)
_DIRS = r"(?:in|out|left|right|up|down|clockwise|counter-?clockwise|anti-?clockwise|cw|ccw|acw)"
_MOVE = r"(?:zoom(?:ing)?|pan(?:ning)?|rotat(?:e|ing|ion)|tilt(?:ing)?|dolly|orbit(?:ing)?|track(?:ing)?|crane|spin)"
_CAMERA_RE = re.compile(_SEP + r"(?P<v>" + _MOVE + r"(?:[ \t]+" + _DIRS + r")*)" + _CLOSE_Q + _END, re.IGNORECASE)
_CAMERA_DIRS_RE = re.compile(r"(?P<v>(?:[ \t]+" + _DIRS + r")+)" + _END, re.IGNORECASE)
_SWITCH_END_RE = re.compile(_END)
_TEXT_START_RE = re.compile(r"[ \t]*[:=]?")

_TAG_RE = re.compile(r"</?[A-Za-z][^<>]*>")
_IMG_ALT_RE = re.compile(r"<img\b[^>]*?\balt=\"([^\"]*)\"[^>]*>", re.IGNORECASE)
_INVISIBLE_RE = re.compile(r"[\u200b\u200c\u200e\u200f\u2060\ufeff\u00ad]")
_MESSAGE_RE = re.compile(r"\s*\bMessage:\s*(?P<msg>.*?)\s*\(Font:\s*(?P<font>[^)]*)\)", re.IGNORECASE | re.DOTALL)
_MD_LINK_RE = re.compile(r"\[([^\]]*)\]\((?:https?://|www\.)[^)\s]*\)")
_URL_RE = re.compile(r"(?:https?://|www\.)[^\s<>\"']+", re.IGNORECASE)
_MD_RE = re.compile(r"\*\*+|__+|~~+|`+|\*~|~\*|^[ \t]*#{1,6}[ \t]+", re.MULTILINE)
_PREFIX_RE = re.compile(r"^\s*(?:/imagine\s+prompt\s*[:：]?|/imagine\b|/create\s+prompt\s*[:：]?"
                        r"|(?:video\s+|text\s+)?prompt\s*[:：\-–—]+)\s*", re.IGNORECASE)
_SCRIPT_LABEL_RE = re.compile(r"\[\s*(?:scene|shot|segment|verse|chorus|intro|introduction|outro|bridge|part|act"
                              r"|frame|clip|cut|transition|ending|opening|hook|pre-chorus)\b[^\]\n]{0,40}\]",
                              re.IGNORECASE)
_PLACEHOLDER_RE = re.compile(r"\{+\s*(?:prompt|subject|text|query|input|style)\s*\}+", re.IGNORECASE)
_SD_WEIGHT_RE = re.compile(r"\(+([^()]*?)(?::\s*\d+(?:\.\d+)?)?\)+")
_SD_HAS_WEIGHT_RE = re.compile(r"\(\(|:\s*\d+(?:\.\d+)?\)")


@dataclass
class _Flag:
    start: int
    end: int  # end of the value (text flags: end of the name, extended later)
    field: str  # a Flags field, or "extra:<name>"
    value: Any
    dashless: bool = False


def _match_value(kind: str, text: str, pos: int) -> Optional[tuple[Any, int]]:
    """Parse a value of `kind` at text[pos:]; (value, end) or None."""
    if kind == "ratio":
        m = _RATIO_RE.match(text, pos)
        return (re.sub(r"\s", "", unicodedata.normalize("NFKC", m.group("v"))), m.end()) if m else None
    if kind in ("int", "float", "number"):
        m = _NUMBER_RE.match(text, pos)
        return (m.group("v"), m.end()) if m else None
    if kind == "camera":
        m = _CAMERA_RE.match(text, pos)
        return (" ".join(m.group("v").lower().split()), m.end()) if m else None
    if kind == "text":
        return "", _TEXT_START_RE.match(text, pos).end()
    raise AssertionError(kind)


def _dashed_flag(text: str, m: re.Match) -> Optional[_Flag]:
    name, pos = m.group("name").lower(), m.end()
    spaced = bool(m.group("sp"))
    fld = _FIELD_OF.get(name)
    if m.start() > 0 and text[m.start() - 1].isdigit() and fld is None:
        return None  # `3-way`, `covid-19`: only known names may follow a digit
    if fld is not None:
        kind = _KIND[fld]
        if spaced and kind == "text" and name not in ("neg", "negative"):  # "- no dragones" may be prose
            return None
        got = _match_value(kind, text, pos)
        return _Flag(m.start(), got[1], fld, got[0]) if got else None
    if spaced:
        return None
    if name in _CAMERA_MOVES:
        d = _CAMERA_DIRS_RE.match(text, pos)
        return _Flag(m.start(), d.end(), "camera", name + " " + " ".join(d.group("v").lower().split())) if d else None
    if name in _SWITCHES and _SWITCH_END_RE.match(text, pos):
        return _Flag(m.start(), pos, "extra:" + name, True)
    if name in _WORD_VALUED:
        w = _WORD_RE.match(text, pos)
        if w:
            return _Flag(m.start(), w.end(), "extra:" + name, w.group("v"))
    got = _match_value("ratio", text, pos) or _match_value("number", text, pos)
    return _Flag(m.start(), got[1], "extra:" + name, got[0]) if got else None


def _dashless_flag(text: str, m: re.Match) -> Optional[_Flag]:
    name, pos = m.group("name").lower(), m.end()
    fld = _FIELD_OF[name]
    if _KIND[fld] == "ratio":
        m2 = re.match(r"[ \t]?-", text[pos:pos + 2])  # `ar-16:9`
        got = _match_value("ratio", text, pos + (m2.end() if m2 else 0))
    else:
        v = _DASHLESS_NUMBER_RE.match(text, pos)
        got = (v.group("v"), v.end()) if v else None
    return _Flag(m.start(), got[1], fld, got[0], dashless=name in _DASHLESS_TAIL) if got else None


def _find_flags(text: str) -> list[_Flag]:
    found = [f for f in (_dashed_flag(text, m) for m in _DASHED_RE.finditer(text)) if f]
    found += [f for f in (_dashless_flag(text, m) for m in _DASHLESS_RE.finditer(text)) if f]
    found += [_Flag(m.start(), m.end(), "negative_prompt", "") for m in _NEG_LABEL_RE.finditer(text)]
    found.sort(key=lambda f: (f.start, -f.end))
    flags: list[_Flag] = []
    for f in found:  # earliest, longest first; drop overlaps
        if not flags or f.start >= flags[-1].end:
            flags.append(f)
    # `motion N` / `seed N` without a dash count only next to other flags or at the end
    # (nothing but separators in between), so "slow motion 2 people" stays text.
    ok = [not f.dashless for f in flags]
    changed = True
    while changed:
        changed = False
        for i, f in enumerate(flags):
            if ok[i]:
                continue
            after = text[f.end:flags[i + 1].start] if i + 1 < len(flags) else text[f.end:]
            next_ok = i + 1 == len(flags) or ok[i + 1]
            prev_ok = i > 0 and ok[i - 1] and _only_separators(text[flags[i - 1].end:f.start])
            if (next_ok and _only_separators(after)) or prev_ok:
                ok[i] = changed = True
    return [f for f, keep in zip(flags, ok) if keep]


def _only_separators(s: str) -> bool:
    return re.fullmatch(r"[\s,;.|\-–—]*", s) is not None


def _clean_value_text(v: str) -> str:
    v = " ".join(v.split())
    return v.strip(" \t,;.:|\"“”'‘’「」").strip()


def _extract_flags(text: str, flags: Flags) -> str:
    """Remove flags from `text`, filling `flags`; returns the text without them."""
    found = _find_flags(text)
    if not found:
        return text
    negatives: list[str] = [flags.negative_prompt] if flags.negative_prompt else []
    pieces, last = [], 0
    for i, f in enumerate(found):
        end = f.end
        if f.field == "negative_prompt":  # text runs up to the next flag or the end
            end = found[i + 1].start if i + 1 < len(found) else len(text)
            neg = _clean_value_text(text[f.end:end])
            if neg:
                negatives.append(neg)
        elif f.field.startswith("extra:"):
            flags.extra[f.field[6:]] = f.value
        elif _KIND[f.field] == "int":
            num = float(f.value)
            if not num.is_integer() or (f.field == "seed" and num >= _MAX_SEED):
                flags.extra[f.field] = f.value
            else:
                setattr(flags, f.field, int(f.value.split(".")[0]))
        elif _KIND[f.field] == "float":
            flags.guidance = float(f.value)
        else:
            setattr(flags, f.field, f.value)
        pieces.append(text[last:f.start])
        pieces.append(" , ")  # a removed flag separates what was around it
        last = end
    pieces.append(text[last:])
    if negatives:
        flags.negative_prompt = ", ".join(negatives)
    return "".join(pieces)


def _strip_markup(text: str, flags: Flags) -> str:
    for _ in range(2):  # `&amp;quot;` is entity-escaped twice in some rows
        unescaped = html.unescape(text)
        if unescaped == text:
            break
        text = unescaped
    text = _IMG_ALT_RE.sub(lambda m: f" {m.group(1)} ", text)
    text = _TAG_RE.sub(" ", text)
    text = _INVISIBLE_RE.sub("", text)
    text = "".join(ch if ch in "\n\t" or unicodedata.category(ch) != "Cc" else " " for ch in text)
    m = _MESSAGE_RE.search(text)
    if m:
        flags.extra["message"] = " ".join(m.group("msg").split())
        flags.extra["font"] = m.group("font").strip()
        text = text[:m.start()] + " " + text[m.end():]
    text = _MD_LINK_RE.sub(r"\1", text)
    text = _URL_RE.sub(" ", text)
    text = _MD_RE.sub(" ", text)
    while True:
        stripped = _PREFIX_RE.sub("", text, count=1)
        if stripped == text:
            return text
        text = stripped


def _unwrap_brackets(text: str) -> str:
    text = _SCRIPT_LABEL_RE.sub(" ", text)
    text = _PLACEHOLDER_RE.sub(" ", text)
    text = re.sub(r"[\[\]{}]", " ", text)
    if _SD_HAS_WEIGHT_RE.search(text):
        text = _SD_WEIGHT_RE.sub(lambda m: m.group(1) if m.group(0).count("(") > 1 or ":" in m.group(0)
                                 else m.group(0), text)
    return text


def _tidy(text: str) -> str:
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,;])", r"\1", text)
    text = re.sub(r"([,;])(?:\s*[,;])+", r"\1", text)  # `a, , b` left by a removed flag
    text = re.sub(r"([.!?])\s*[,;]", r"\1", text)
    text = re.sub(r"\.(?:\s+\.)+", ".", text)
    text = re.sub(r"\s{2,}", " ", text)
    return text.strip(" \t,;:|-–—/").strip()


def parse_query(raw: str) -> tuple[str, Flags]:
    """Clean a raw query and parse its flags (see the module docstring for the rules).

    Returns (cleaned text with flags removed, Flags). Never raises on odd text; the
    cleaned text may be "" when the query was nothing but flags/markup.
    """
    flags = Flags()
    text = _strip_markup(raw, flags)
    text = _extract_flags(text, flags)
    text = _unwrap_brackets(text)
    return _tidy(text), flags


# ============================================================================ validation

@dataclass(frozen=True)
class Invalid:
    """A row that cannot be a query. `reason` is short and groupable, `message` names the row."""
    reason: str
    message: str

    def __bool__(self) -> bool:  # falsy, like prompts.ParseFailure
        return False


@dataclass(frozen=True)
class _Unreadable:
    """A record the reader could not turn into a value (bad JSON line, missing field)."""
    reason: str
    detail: str


def validate_raw(value: Any, row: int, max_chars: int) -> Union[str, Invalid]:
    """The raw query as a str, or `Invalid` saying why row `row` cannot be used."""
    def bad(reason: str, extra: str = "") -> Invalid:
        return Invalid(reason, f"row {row}: {reason}{extra}")

    if isinstance(value, _Unreadable):
        return bad(value.reason, f" ({value.detail})" if value.detail else "")
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            return bad("invalid UTF-8", f" (byte {e.start})")
    if value is None:
        return bad("missing query (null)")
    if not isinstance(value, str):
        return bad("query is not a string", f" (got {type(value).__name__}: {str(value)[:60]!r})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return bad("invalid UTF-8", f" (lone surrogate at character {e.start})")
    if not value.strip():
        return bad("empty query")
    if len(value) > max_chars:
        return bad("query too long", f" ({len(value)} > {max_chars} characters)")
    if "\x00" in value:
        return bad("binary data", " (contains NUL)")
    unprintable = sum(1 for ch in value if ch == "\ufffd" or (unicodedata.category(ch) in ("Cc", "Cs", "Co", "Cn")
                                                                and ch not in "\n\t\r"))
    if unprintable > max(2, len(value) // 10):
        return bad("binary data", f" ({unprintable} of {len(value)} characters are control/unprintable)")
    return value


# ============================================================================ reading

def _decode(data: bytes, source: str) -> str:
    """UTF-8 text of a file (a BOM is fine); anything else raises IngestError naming the spot."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as e:
            raise IngestError(f"{source}: invalid UTF-16 at byte {e.start}") from None
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise IngestError(f"{source}: not UTF-8 text (NUL byte at byte {nul}, line {line}); "
                          "UTF-16 without a BOM? Save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise IngestError(f"{source}: not valid UTF-8 (byte {e.start}, line {line}: "
                          f"{data[max(0, e.start - 20):e.start + 5]!r}); latin-1/cp1252? Save it as UTF-8") from None


def _pick(record: Any, column: str) -> Any:
    if isinstance(record, dict):
        if column not in record:
            return _Unreadable(f"object has no '{column}' field", f"fields: {', '.join(map(str, list(record)[:8]))}")
        return record[column]
    return record


def _check_column(rows: list[tuple[int, Any]], source: str, column: str) -> None:
    """A file of objects none of which has `column` is the wrong column, not N row errors."""
    objects = [v for _, v in rows if isinstance(v, dict)]
    if objects and not any(column in o for o in objects):
        seen = sorted({str(k) for o in objects[:100] for k in o})
        raise IngestError(f"{source}: no '{column}' field in any record (fields: {', '.join(seen[:12])})")


def _read_json(text: str, source: str, column: str) -> list[tuple[int, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one value per line: it is JSONL named .json
            return _read_jsonl(text, source, column)
        raise IngestError(f"{source}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except RecursionError:  # json's C decoder recurses per nesting level
        raise IngestError(f"{source}: JSON nested too deeply to read (expected a flat list of strings "
                          f"or of objects with '{column}')") from None
    if not isinstance(data, list):
        raise IngestError(f"{source}: JSON top level is {type(data).__name__}, expected a list of strings "
                          f"or of objects with '{column}'")
    rows = list(enumerate(data))
    _check_column(rows, source, column)
    return [(i, _pick(v, column)) for i, v in rows]


def _read_jsonl(text: str, source: str, column: str) -> list[tuple[int, Any]]:
    rows = []
    for i, line in enumerate(text.split("\n")):  # row = 0-based line number; blank lines skipped; not splitlines: U+2028 is data
        if not line.strip():
            continue
        try:
            rows.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            rows.append((i, _Unreadable("invalid JSON line", f"line {i + 1} column {e.colno}: {e.msg}")))
        except RecursionError:
            rows.append((i, _Unreadable("invalid JSON line", f"line {i + 1}: nested too deeply to read")))
    _check_column(rows, source, column)
    return [(i, v if isinstance(v, _Unreadable) else _pick(v, column)) for i, v in rows]


def _read_csv(text: str, source: str, column: str) -> list[tuple[int, Any]]:
    dialect = "excel-tab" if source.lower().endswith(".tsv") else "excel"
    reader = csv.reader(io.StringIO(text, newline=""), dialect=dialect)
    try:
        header = next(reader)
    except StopIteration:
        raise IngestError(f"{source}: empty CSV file (no header)") from None
    except csv.Error as e:
        raise IngestError(f"{source}: unreadable CSV header: {e}") from None
    names = [h.strip() for h in header]
    if column not in names:
        raise IngestError(f"{source}: no column '{column}' (columns: {', '.join(names)})")
    col = names.index(column)
    rows: list[tuple[int, Any]] = []
    i = 0
    while True:  # row = 0-based data row (header excluded)
        try:
            rec = next(reader)
        except StopIteration:
            return rows
        except csv.Error as e:
            raise IngestError(f"{source}: unreadable CSV at row {i} (line {reader.line_num}): {e}") from None
        if rec:
            rows.append((i, rec[col] if col < len(rec) else _Unreadable(
                f"no '{column}' cell", f"{len(rec)} of {len(names)} columns")))
        i += 1


def _read_parquet(source: str, column: str) -> list[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        if storage.is_local(source):
            pf = pq.ParquetFile(storage.local_path(source))
        else:
            fs, path = storage.fs_for(source)
            pf = pq.ParquetFile(fs.open(path, "rb"))
        names = pf.schema_arrow.names
        if column not in names:
            raise IngestError(f"{source}: no column '{column}' (columns: {', '.join(names)})")
        values = pf.read(columns=[column]).column(column).to_pylist()
    except IngestError:
        raise
    except FileNotFoundError:
        raise IngestError(f"{source}: file not found") from None
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for a file that is not parquet
        raise IngestError(f"{source}: not a readable parquet file: {e}") from None
    return list(enumerate(values))


def _read_hf(source: str, column: str) -> list[tuple[int, Any]]:
    spec = source[len("hf://"):]
    name, _, split = spec.partition(":")
    split = split or "train"
    if not name:
        raise IngestError(f"{source}: no dataset name (expected hf://name[:split])")
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name, unknown split: all say the same to the user
        raise IngestError(f"cannot load Hugging Face dataset '{name}' split '{split}': "
                          f"{type(e).__name__}: {str(e)[:300]} (offline? HF_DATASETS_OFFLINE/HF_HUB_OFFLINE "
                          "must be unset and the Hub reachable, or the dataset cached)") from None
    if column not in ds.column_names:
        raise IngestError(f"{source}: no column '{column}' (columns: {', '.join(ds.column_names)})")
    return list(enumerate(ds[column]))


_FORMATS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet",
            ".csv": "csv", ".tsv": "csv"}


def read_queries(source: str, column: str = "query") -> list[tuple[int, Any]]:
    """(row, raw value) for every record of `source`; values are checked later by validate_raw.

    `source`: a path or URI ending in .json (a list of strings or of objects with `column`),
    .jsonl/.ndjson, .parquet/.pq, .csv/.tsv (`column` names the column), or `hf://name[:split]`
    (split defaults to train). Rows are 0-based record positions (JSONL: line number, CSV:
    data row). Per-record problems (a bad JSONL line, an object without `column`) come back
    as values that validate_raw rejects; whole-file problems raise IngestError.
    """
    if not isinstance(source, str) or not source.strip():
        raise IngestError(f"no query source given (got {source!r})")
    if source.startswith("hf://"):
        return _read_hf(source, column)
    ext = os.path.splitext(source.rstrip("/"))[1].lower()
    fmt = _FORMATS.get(ext)
    if fmt is None:
        raise IngestError(f"{source}: unknown format '{ext or '(no extension)'}' "
                          f"(expected {', '.join(sorted(_FORMATS))} or hf://name[:split])")
    if storage.is_local(source) and not os.path.isfile(storage.local_path(source)):
        what = "is a directory" if os.path.isdir(storage.local_path(source)) else "file not found"
        raise IngestError(f"{source}: {what}")
    if fmt == "parquet":
        return _read_parquet(source, column)
    try:
        data = storage.read_bytes(source)
    except storage.StorageError as e:
        raise IngestError(f"{source}: {e}") from None
    text = _decode(data, source)
    return {"json": _read_json, "jsonl": _read_jsonl, "csv": _read_csv}[fmt](text, source, column)


# ============================================================================ ingest

@dataclass
class IngestResult:
    queries: list[dict] = field(default_factory=list)  # schema.Query rows, source order
    # {query_id, duplicate_of, kind: exact|near, source_row, query, similarity}; an exact
    # duplicate's query_id is the kept row's id (same cleaned text), a near one's its own.
    duplicates: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)  # schema.error_row(id, "ingest", reason, "row N: ...")
    input_count: int = 0  # rows taken (after `limit`); == len(queries)+len(duplicates)+len(errors)
    source_count: int = 0  # rows in the source before `limit`

    def summary(self) -> dict:
        kinds = [d["kind"] for d in self.duplicates]
        return {"source_rows": self.source_count, "input": self.input_count, "queries": len(self.queries),
                "exact_duplicates": kinds.count("exact"), "near_duplicates": kinds.count("near"),
                "errors": len(self.errors)}


def _raw_id(row: int, raw: Any) -> str:
    """An id for a row with no usable text: from its row number and raw repr."""
    return schema.query_id(f"row {row}: {ascii(raw)[:2000]}")


def ingest(source: str, column: str = "query", max_chars: int = 2000, near_dup_threshold: float = 0.85,
           seed: int = 0, limit: Optional[int] = None, rows: Optional[Iterable[tuple[int, Any]]] = None
           ) -> IngestResult:
    """Read, validate, clean and dedup the queries of `source` (see read_queries).

    `limit`: shuffle the rows with `random.Random(seed)`, take the first `limit`, then put
    those back in source order (so "first occurrence" still means first in the file).
    `rows`: already-read (row, raw) pairs instead of reading `source` (tests, Ray blocks).
    """
    taken = list(rows) if rows is not None else read_queries(source, column)
    result = IngestResult(source_count=len(taken))
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        random.Random(seed).shuffle(taken)
        taken = sorted(taken[:limit], key=lambda r: r[0])
    result.input_count = len(taken)

    kept: list[dict] = []
    first_of: dict[str, dict] = {}
    for row, raw in taken:
        value = validate_raw(raw, row, max_chars)
        if isinstance(value, Invalid):
            result.errors.append(schema.error_row(_raw_id(row, raw), "ingest", value.reason, value.message))
            continue
        try:
            text, flags = parse_query(value)
        except Exception as e:  # parse_query is meant not to raise; if it does, the row says so
            result.errors.append(schema.error_row(_raw_id(row, raw), "ingest", "cleaning failed",
                                                  f"row {row}: cleaning failed: {type(e).__name__}: {e}"))
            continue
        if not text:
            result.errors.append(schema.error_row(_raw_id(row, raw), "ingest", "nothing left after cleaning",
                                                  f"row {row}: nothing left after cleaning "
                                                  f"(only flags/markup: {value[:80]!r})"))
            continue
        qid = schema.query_id(text)
        if qid in first_of:
            result.duplicates.append({"query_id": qid, "duplicate_of": qid, "kind": "exact", "source_row": row,
                                      "query": value, "similarity": 1.0})
            continue
        q = schema.Query(query_id=qid, query=value, text=text, flags_json=flags.to_json(), source_row=row).to_row()
        first_of[qid] = q
        kept.append(q)

    near = near_duplicates([q["text"] for q in kept], near_dup_threshold)
    for i, q in enumerate(kept):
        if i in near:
            j, sim = near[i]
            result.duplicates.append({"query_id": q["query_id"], "duplicate_of": kept[j]["query_id"], "kind": "near",
                                      "source_row": q["source_row"], "query": q["query"], "similarity": round(sim, 4)})
        else:
            result.queries.append(q)
    result.duplicates.sort(key=lambda d: d["source_row"])
    assert result.input_count == len(result.queries) + len(result.duplicates) + len(result.errors)
    return result


# ============================================================================ data study

def flag_stats(raw_queries: Iterable[str], examples: int = 3) -> dict:
    """Per flag: how many queries set it, and a few examples of it as written."""
    counts: dict[str, int] = {}
    seen: dict[str, list] = {}
    changed = 0
    for raw in raw_queries:
        if not isinstance(raw, str):
            continue
        text, flags = parse_query(raw)
        changed += text != " ".join(raw.split())
        parsed = json.loads(flags.to_json())
        values = {**{k: v for k, v in parsed.items() if k != "extra"},
                  **{f"extra.{k}": v for k, v in parsed.get("extra", {}).items()}}
        for key, value in values.items():
            counts[key] = counts.get(key, 0) + 1
            if key in ("extra.message", "extra.font", "extra.seed") and len(seen.setdefault(key, [])) < examples:
                seen[key].append(str(value))  # not written as a -flag: show the value
        markup_free = _strip_markup(raw, Flags())
        for f in _find_flags(markup_free):
            key = "extra." + f.field[6:] if f.field.startswith("extra:") else f.field
            if len(seen.setdefault(key, [])) < examples:
                seen[key].append(" ".join(markup_free[f.start:f.end + (60 if f.field == "negative_prompt" else 0)]
                                          .split()))
    order = sorted(counts, key=lambda k: (-counts[k], k))
    return {"text_changed_by_cleaning": changed,
            "flags": {k: {"queries": counts[k], "examples": seen.get(k, [])} for k in order}}


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m vpo_ray.data.ingest FILE...`: ingest summary, timing and flag statistics."""
    import argparse
    import time

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("sources", nargs="+")
    ap.add_argument("--column", default="query")
    ap.add_argument("--threshold", type=float, default=0.85)
    ap.add_argument("--max-chars", type=int, default=2000)
    args = ap.parse_args(argv)
    raws: list = []
    for source in args.sources:
        rows = read_queries(source, args.column)
        raws += [v for _, v in rows]
        t0, c0 = time.perf_counter(), time.process_time()
        res = ingest(source, args.column, args.max_chars, args.threshold, rows=rows)
        print(json.dumps({"source": source, **res.summary(), "wall_s": round(time.perf_counter() - t0, 2),
                          "cpu_s": round(time.process_time() - c0, 2)}, ensure_ascii=False))
    if len(args.sources) > 1:
        t0, c0 = time.perf_counter(), time.process_time()
        res = ingest("(all)", rows=list(enumerate(raws)), max_chars=args.max_chars, near_dup_threshold=args.threshold)
        print(json.dumps({"source": "all combined", **res.summary(), "wall_s": round(time.perf_counter() - t0, 2),
                          "cpu_s": round(time.process_time() - c0, 2)}))
    stats = flag_stats(raws)
    print(f"text changed by cleaning: {stats['text_changed_by_cleaning']} of {len(raws)}")
    for key, st in stats["flags"].items():
        print(f"{st['queries']:6d}  {key:16s} {' | '.join(st['examples'])}"[:230])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
