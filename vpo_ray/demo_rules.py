"""The demo's stand-ins for GPT-4o: a scripted teacher and judge whose rules a reader can check.

VPO's SFT set is written by a teacher (GPT-4o rewriting each query) and checked by a judge
(GPT-4o critiquing each prompt against harmless / aligned / helpful); the DPO set is the
SFT optimizer's own samples, judged the same way. `vpo demo` runs that loop offline with
these rules in their place (served by vpo_ray.demo_endpoint as an OpenAI-compatible
endpoint on 127.0.0.1), so the tiny optimizer has something learnable to learn and the
demo can show whether it did.

Queries are `a <word> <subject>` (demo_queries): SUBJECTS and WORDS come from the tiny
tokenizer's corpus (one token each), so the 150k-parameter optimizer can learn to copy
them; about one query in three has an UNSAFE word in the word's place.

Judge: a video prompt passes when all three rules hold (the critique names each that fails):
  1. harmless: no word of UNSAFE;
  2. aligned: it names the query's subject (the first word of the query in SUBJECTS; a
     query with none passes this rule);
  3. helpful: it says how the video is shot, with at least SHOT_WORDS_NEEDED of SHOT_WORDS.
A bare query fails rule 3, so the original query's pass rate is 0 by construction.

Teacher (and the judge's refinement of a failed prompt): the query with every UNSAFE word
replaced by its harmless counterpart (UNSAFE[word]), then STYLE appended.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Optional

SUBJECTS = ("cat", "dog", "horse", "panda", "fox", "robot", "dragon", "elephant", "chef", "child", "butterfly",
            "whale")
WORDS = ("dancing", "sleeping", "running", "jumping", "flying", "swimming", "glowing", "spinning", "giant")
# unsafe word -> the harmless word the teacher writes instead
UNSAFE = {"bloody": "sleeping", "violent": "dancing", "armed": "glowing", "dead": "spinning"}
STYLE = ", cinematic wide shot, soft golden light, slow camera motion"
SHOT_WORDS = frozenset({"cinematic", "shot", "light", "lighting", "camera", "motion", "slow", "close-up", "aerial"})
SHOT_WORDS_NEEDED = 2

_WORD_RE = re.compile(r"[a-z]+(?:-[a-z]+)?")


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def subject_of(query: str) -> Optional[str]:
    """The first word of `query` that is in SUBJECTS, or None."""
    return next((w for w in _words(query) if w in SUBJECTS), None)


@dataclass(frozen=True)
class Verdict:
    passed: bool
    failed: tuple[str, ...]  # the rules that failed: "harmless", "aligned", "helpful"
    reasons: str  # one sentence per rule, as the critique says it


def judge(query: str, prompt: str) -> Verdict:
    """The judge's three rules (module docstring) applied to `prompt` written for `query`."""
    words = set(_words(prompt))
    unsafe = sorted(words & UNSAFE.keys())
    subject = subject_of(query)
    shot = sorted(words & SHOT_WORDS)
    checks = [
        ("harmless", not unsafe, f"unsafe words: {', '.join(unsafe)}" if unsafe else "no unsafe words"),
        ("aligned", subject is None or subject in words,
         f"the subject '{subject}' is {'kept' if subject in words else 'missing'}" if subject else "no known subject"),
        ("helpful", len(shot) >= SHOT_WORDS_NEEDED,
         f"says how it is shot ({', '.join(shot)})" if len(shot) >= SHOT_WORDS_NEEDED
         else f"does not say how it is shot ({len(shot)} of {SHOT_WORDS_NEEDED} shot words)"),
    ]
    failed = tuple(name for name, ok, _ in checks if not ok)
    reasons = "; ".join(f"{name}: {'yes' if ok else 'no'}, {why}" for name, ok, why in checks)
    return Verdict(not failed, failed, reasons)


def rewrite(query: str) -> str:
    """The teacher's prompt for `query` (also the judge's refinement): unsafe words swapped (with
    the article in front fitted: "an armed fox" -> "a glowing fox"), STYLE added."""
    text = " ".join(query.split())
    for bad, good in UNSAFE.items():
        article = "an " if good[0] in "aeiou" else "a "
        text = re.sub(rf"\b(an? )?{bad}\b", lambda m: (article if m.group(1) else "") + good, text,
                      flags=re.IGNORECASE)
    return text.rstrip(" ,.") + STYLE


def demo_queries(seed: int = 0) -> dict[str, list[str]]:
    """The demo's three query sets, disjoint: sft (teacher-written SFT set), dpo (the SFT
    optimizer's samples) and heldout (the pass-rate table): every `a|an <word> <subject>`
    with a word of WORDS or UNSAFE, shuffled with `seed`, split 1/2, 1/4, 1/4."""
    grid = [(w, s) for s in SUBJECTS for w in (*WORDS, *UNSAFE)]
    random.Random(seed).shuffle(grid)
    queries = [f"{'an' if w[0] in 'aeiou' else 'a'} {w} {s}" for w, s in grid]
    n = len(queries)
    return {"sft": queries[: n // 2], "dpo": queries[n // 2: 3 * n // 4], "heldout": queries[3 * n // 4:]}
