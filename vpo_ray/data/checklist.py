"""Video checklists (VisionReward style): yes/no questions about a video, each with a weight.

A video's checklist score is the sum of the weights of the questions answered yes (the
official rule: thu-coai/VPO src/process_data.py `get_score`). A checklist is a YAML or
JSON file in one of two layouts:

  questions inline (the project's own, vpo_ray/checklists/vpo_ray.yaml):

    name: vpo_ray
    questions:
      - id: align_subject          # unique; answers are stored and compared by id
        question: "Does the video show the main subject described in: {query}?"
        weight: 2.0                # a number >= 0 (default 1.0)
        dimension: alignment       # evaluation groups questions by it (default "overall")

  VisionReward's own files (THUDM/VisionReward, VisionReward_Video/):

    name: visionreward-video
    questions_file: VisionReward_video_qa.txt   # one question a line; relative to this file
    weights: [0.954, 0.252, 0.0, ...]           # one per question, or weights_file: weight.json

In a question, `{query}` and VisionReward's `[[prompt]]` stand for the user's query.
Questions of the second layout get ids q1, q2, ... in file order. `load_checklist(spec)`
takes a shipped name (a file in vpo_ray/checklists/) or a path; any problem raises
ConfigError naming the file and the question.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from vpo_ray.config import ConfigError

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "checklists"
PLACEHOLDERS = ("{query}", "[[prompt]]")


@dataclass(frozen=True)
class ChecklistItem:
    id: str
    question: str  # asked about the video; {query} / [[prompt]] = the user's query
    weight: float = 1.0
    dimension: str = "overall"  # e.g. alignment | quality | motion | physics | safety

    def ask(self, query: str) -> str:
        """The question with the query filled in (replaced verbatim: other braces stay)."""
        q = self.question
        for p in PLACEHOLDERS:
            q = q.replace(p, query)
        return q


@dataclass(frozen=True)
class Checklist:
    name: str
    items: tuple[ChecklistItem, ...]

    def weights(self) -> dict[str, float]:
        return {it.id: it.weight for it in self.items}

    def as_dicts(self) -> list[dict]:
        """Plain dicts (what travels to the video judge actors and into metrics.json)."""
        return [asdict(it) for it in self.items]


def shipped() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml"))


def _read(path: Path) -> Any:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"checklist {path}: cannot read it: {e}") from None
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"checklist {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None


def _weight(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"{where}: weight must be a number >= 0, got {value!r}")
    return float(value)


def _inline(data: dict, path: Path) -> list[ChecklistItem]:
    questions = data.get("questions")
    if not isinstance(questions, list) or not questions:
        raise ConfigError(f"checklist {path}: 'questions' must be a non-empty list")
    items = []
    for i, q in enumerate(questions):
        where = f"checklist {path} question {i}"
        if not isinstance(q, dict):
            raise ConfigError(f"{where}: expected a mapping with id, question, weight")
        unknown = sorted(set(q) - {"id", "question", "weight", "dimension"})
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: id, question, weight, dimension)")
        if not isinstance(q.get("id"), str) or not q["id"].strip():
            raise ConfigError(f"{where}: 'id' must be a non-empty string")
        if not isinstance(q.get("question"), str) or not q["question"].strip():
            raise ConfigError(f"{where} ({q['id']}): 'question' must be a non-empty string")
        items.append(ChecklistItem(q["id"], q["question"], _weight(q.get("weight", 1.0), f"{where} ({q['id']})"),
                                   str(q.get("dimension", "overall"))))
    return items


def _visionreward(data: dict, path: Path) -> list[ChecklistItem]:
    qfile = path.parent / str(data["questions_file"])
    try:
        lines = [ln.strip() for ln in qfile.read_text(encoding="utf-8").split("\n")]
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"checklist {path}: questions_file {qfile}: cannot read it: {e}") from None
    questions = [ln for ln in lines if ln]
    if "weights_file" in data:
        weights = _read(path.parent / str(data["weights_file"]))
    else:
        weights = data.get("weights")
    if not isinstance(weights, list):
        raise ConfigError(f"checklist {path}: give 'weights' (a list) or 'weights_file' (a JSON list)")
    if len(weights) != len(questions):
        raise ConfigError(f"checklist {path}: {len(weights)} weights for {len(questions)} questions in {qfile}")
    return [ChecklistItem(f"q{i + 1}", q, _weight(w, f"checklist {path} question {i + 1}"))
            for i, (q, w) in enumerate(zip(questions, weights))]


def load_checklist(spec: str) -> Checklist:
    """The checklist named by `spec`: a shipped name (see `shipped()`) or a YAML/JSON path."""
    path = Path(spec).expanduser()
    if not path.suffix and (SHIPPED_DIR / f"{spec}.yaml").exists():
        path = SHIPPED_DIR / f"{spec}.yaml"
    if not path.is_file():
        raise ConfigError(f"checklist: {spec!r} is neither a file nor a shipped checklist ({', '.join(shipped())})")
    data = _read(path)
    if not isinstance(data, dict):
        raise ConfigError(f"checklist {path}: expected a mapping with 'questions' or 'questions_file'")
    items = _visionreward(data, path) if "questions_file" in data else _inline(data, path)
    ids = [it.id for it in items]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ConfigError(f"checklist {path}: question id {dup[0]!r} appears twice")
    return Checklist(name=str(data.get("name") or path.stem), items=tuple(items))


SCORES = ("binary", "soft")


def score(answers: Mapping[str, tuple[bool, float]], weights: Mapping[str, float], mode: str = "binary") -> float:
    """A video's checklist score from {question id: (answer, P(yes))}.

    binary: the sum of the weights of the yes answers (official, src/process_data.py
    get_score); soft: the sum of weight x P(yes) (vpo_ray's ablation). KeyError if an
    answer is missing: callers check the checklist first and name the row.
    """
    if mode not in SCORES:
        raise ValueError(f"video score: expected one of {', '.join(SCORES)}, got {mode!r}")
    k = 0 if mode == "binary" else 1
    return float(sum(w * float(answers[q][k]) for q, w in weights.items()))


def as_items(checklist: Sequence[Mapping] | Checklist) -> tuple[ChecklistItem, ...]:
    """Items from a Checklist or from its `as_dicts()` (as the actors receive it)."""
    if isinstance(checklist, Checklist):
        return checklist.items
    return tuple(ChecklistItem(**dict(c)) for c in checklist)
