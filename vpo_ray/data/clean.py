"""Cleaning one raw query: markup, invisible characters, prefixes, brackets, whitespace, flags.

`parse_query(raw) -> (text, Flags)`, in order:
  1. HTML: entities unescaped (`&quot;` `&#39;` ...), `<img alt="🐺">` emoji kept as the
     emoji, every other tag dropped (its inner text kept).
  2. Invisible characters (zero-width space, BOM, bidi marks) and control characters
     other than newline/tab dropped. ZWJ and variation selectors stay (emoji sequences).
  3. Pika's text overlay `Message: X (Font: Y)` -> flags.extra {"message": X, "font": Y}.
  4. Markdown links keep their text, URLs go, `**` `__` `~~` backticks and heading marks go.
  5. Prefixes `prompt:`, `Prompt -`, `/imagine prompt:`, `/imagine`, `/create prompt:` go.
  6. Flags are parsed and removed (grammar: `vpo_ray.data.flags`).
  7. Script labels `[Scene 2: ...]`, `[Verse]` and template placeholders `{prompt}` go;
     every other `[...]` / `{...}` is unwrapped (its text is often the whole query), and
     Stable Diffusion weights `((girl:1.5))` become `girl`.
  8. Whitespace collapses to single spaces; separators left behind by removed flags
     (`a, , b`, trailing `,`/`-`) are tidied. Non-ASCII text (CJK, emoji) is never touched.
"""
from __future__ import annotations

import html
import re
import unicodedata

from vpo_ray.data.flags import extract_flags
from vpo_ray.schema import Flags

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


def strip_markup(text: str, flags: Flags) -> str:
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
    text = strip_markup(raw, flags)
    text = extract_flags(text, flags)
    text = _unwrap_brackets(text)
    return _tidy(text), flags
