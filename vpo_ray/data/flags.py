"""The flag grammar: `-ar 16:9`, `--neg blurry`, `-camera zoom in`, `gs 12`, `--style raw`.

Conservative: a word only becomes a flag when it cannot be prose.
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

`find_flags(text)` locates them (the data study shows them as written); `extract_flags`
removes them from the text and fills a `schema.Flags`.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Optional

from vpo_ray.schema import Flags

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


def find_flags(text: str) -> list[_Flag]:
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


def extract_flags(text: str, flags: Flags) -> str:
    """Remove flags from `text`, filling `flags`; returns the text without them."""
    found = find_flags(text)
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
