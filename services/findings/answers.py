"""Parse the model's free-text answer into a structured finding.

CMR-VL answers are short English report sentences ("There is a small amount of pericardial
effusion.", "The left ventricular apex shows thinning, with decreased wall motion ... paradoxical
motion at the apex."). The parser is rule based and conservative: it works clause by clause
(negation only counts inside the clause that names the finding), and anything it cannot decide
- empty or non-text output, no mention of the finding, or a mention both negated and affirmed -
becomes status "unparseable" instead of a guess or an exception.

Segments use the AHA 17-segment model: 1-6 basal (anterior, anteroseptal, inferoseptal, inferior,
inferolateral, anterolateral), 7-12 mid (same walls), 13-16 apical (anterior, septal, inferior,
lateral), 17 apex.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from services.findings.catalog import Task, get_task

PRESENT, ABSENT, UNPARSEABLE = "present", "absent", "unparseable"


@dataclass
class Finding:
    task_id: str
    status: str  # present | absent | unparseable
    grade: str | None = None
    segments: list[int] = field(default_factory=list)  # AHA 1..17, sorted
    patterns: list[str] = field(default_factory=list)
    text: str = ""
    reason: str = ""  # why it is unparseable
    catalog_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- vocabulary -------------------------------------------------------------------------------

_NEGATION = re.compile(
    r"\b(no|not|without|absent|absence|none|negative|free of|unremarkable|neither|nor|"
    r"cannot be seen|is not seen|was not seen|never)\b|n't\b"
)
# Words naming each finding, per task id.
_SUBJECT = {
    "pericardial_effusion": re.compile(r"effusion|pericardial fluid|fluid in the pericard"),
    "lge": re.compile(
        r"enhancement|\blge\b|hyperenhanc|scar|fibrosis|infarct|\bmvo\b|microvascular obstruction"
    ),
    "myocardial_edema": re.compile(r"o?edema|hyperintens|high signal|increased signal|t2 signal"),
    "lv_thrombus": re.compile(r"thromb|\bclot\b|filling defect"),
}
# Finding-specific phrases that report "normal" without a negation word.
_NORMAL = {
    "wall_motion": re.compile(
        r"\bcoordinated\b|wall motion (is|was|appears|appeared)? ?normal|normal (regional )?wall motion"
    ),
}
_GRADES = {
    # effusion size words -> grade (first match in the order given wins: "small to moderate" = moderate)
    "pericardial_effusion": [
        ("large", re.compile(r"\b(large|massive|substantial|significant)\b")),
        ("moderate", re.compile(r"\bmoderate\b")),
        ("small", re.compile(r"\b(small|trace|minimal|minor|slight|little|mild)\b")),
    ],
}
# Wall motion patterns, worst first (the finding's grade is the worst one named).
_MOTION = [
    ("dyskinesis", re.compile(r"dyskine|paradoxical")),
    ("akinesis", re.compile(r"akine|\b(absent|no|lack of|loss of) (wall )?motion|motion (is )?absent|disappear")),
    ("hypokinesis", re.compile(
        r"hypokine|(reduced|decreased|diminished|weakened|weak|impaired|poor|attenuated) (wall )?"
        r"(motion|contract|thickening|movement)|(motion|contractility|contraction) (is )?"
        r"(reduced|decreased|diminished|weakened|weak|impaired)")),
]
_UNCOORDINATED = re.compile(r"uncoordinated|incoordinat|not coordinated|dyssynchron|asynchron|abnormal")
_LGE_PATTERNS = [
    ("transmural", re.compile(r"transmural|full[- ]thickness")),
    ("subendocardial", re.compile(r"subendocardi")),
    ("mid_wall", re.compile(r"mid[- ]?wall|midmyocardi|mid-myocardi|intramural|intramyocardi")),
    ("subepicardial", re.compile(r"subepicardi|epicardial")),
    ("patchy", re.compile(r"patchy|spotty|focal")),
    ("mvo", re.compile(r"microvascular obstruction|\bmvo\b|no[- ]reflow")),
]

# AHA segments by level and wall.
_LEVELS = {
    "basal": re.compile(r"\bbas(al|e)\b"),
    "mid": re.compile(r"\bmid(dle)?\b(?![- ]?(wall|myocardi))"),
    "apical": re.compile(r"\bapical\b"),
}
_WALLS: dict[str, tuple[re.Pattern, dict[str, list[int]]]] = {
    "anteroseptal": (re.compile(r"anterior septa|anterosept|antero-sept"),
                     {"basal": [2], "mid": [8], "apical": [14]}),
    "inferoseptal": (re.compile(r"inferior septa|inferosept|infero-sept|posterior septa"),
                     {"basal": [3], "mid": [9], "apical": [14]}),
    "anterolateral": (re.compile(r"anterolateral|antero-lateral|anterior lateral"),
                      {"basal": [6], "mid": [12], "apical": [16]}),
    "inferolateral": (re.compile(r"inferolateral|infero-lateral|posterolateral|posterior wall|inferior lateral"),
                      {"basal": [5], "mid": [11], "apical": [16]}),
    "septal": (re.compile(r"\bsept(al|um)\b"), {"basal": [2, 3], "mid": [8, 9], "apical": [14]}),
    "anterior": (re.compile(r"\banterior\b(?! ?(septa|lateral))"), {"basal": [1], "mid": [7], "apical": [13]}),
    "inferior": (re.compile(r"\binferior\b(?! ?(septa|lateral))"), {"basal": [4], "mid": [10], "apical": [15]}),
    "lateral": (re.compile(r"(?<![-o])\blateral\b"), {"basal": [5, 6], "mid": [11, 12], "apical": [16]}),
}
_APEX = re.compile(r"\bapex\b|apical cap|apical segment|cardiac apex")


def _clauses(text: str) -> list[str]:
    # Split on sentence/clause punctuation and contrastive conjunctions: negation is clause-local.
    return [c.strip() for c in re.split(r"[.;:,!?\n]|\bbut\b|\bwhile\b|\bwhereas\b|\bexcept\b", text) if c.strip()]


def _levels_in(text: str) -> list[str]:
    return [name for name, rx in _LEVELS.items() if rx.search(text)]


def parse_segments(text: str) -> list[int]:
    """AHA segment numbers named in `text`.

    A wall takes the level words written between the previous wall and itself ("basal inferior
    and mid anterior" -> 4, 7); a wall with none inherits the previous wall's levels ("basal to
    mid anterior and anteroseptal" -> 1, 2, 7, 8); with no level at all it spans base to apex.
    """
    segs: set[int] = set()
    for clause in _clauses(text.lower()):
        hits: list[tuple[int, int, dict[str, list[int]]]] = []
        for _name, (rx, by_level) in _WALLS.items():  # longer names first: they claim their span
            for m in rx.finditer(clause):
                if not any(a <= m.start() < b for a, b, _ in hits):
                    hits.append((m.start(), m.end(), by_level))
        hits.sort(key=lambda h: h[0])
        prev_end, levels = 0, []
        for start, end, by_level in hits:
            levels = _levels_in(clause[prev_end:start]) or levels
            for level in levels or ["basal", "mid", "apical"]:
                segs.update(by_level[level])
            prev_end = end
        if _APEX.search(clause):
            segs.add(17)
        elif not hits and "apical" in _levels_in(clause):
            segs.update([13, 14, 15, 16])  # "apical segments" without a wall
    return sorted(segs)


def _presence(task_id: str, clauses: list[str]) -> tuple[str, str]:
    subject = _SUBJECT[task_id]
    pos = neg = 0
    for clause in clauses:
        if not subject.search(clause):
            continue
        if _NEGATION.search(clause):
            neg += 1
        else:
            pos += 1
    if pos and neg:
        return UNPARSEABLE, "the answer both affirms and negates the finding"
    if pos:
        return PRESENT, ""
    if neg:
        return ABSENT, ""
    return UNPARSEABLE, "the answer does not mention the finding"


def _wall_motion(clauses: list[str]) -> tuple[str, str, list[str]]:
    patterns: list[str] = []
    abnormal = normal = 0
    for clause in clauses:
        negated = bool(_NEGATION.search(clause))
        named = [name for name, rx in _MOTION if rx.search(clause)]
        # "no motion" is itself akinesis, so only drop patterns whose clause negates something else
        if named and not (negated and "akinesis" not in named):
            patterns.extend(n for n in named if n not in patterns)
            abnormal += 1
        elif _UNCOORDINATED.search(clause) and not re.search(r"\bno\b.*abnormal", clause):
            abnormal += 1
        elif _NORMAL["wall_motion"].search(clause) or (
            negated and re.search(r"abnormal|dyskine|akine|hypokine|paradox", clause)
        ):
            normal += 1
    order = [name for name, _ in _MOTION]
    patterns.sort(key=order.index)
    if abnormal:
        return PRESENT, "", patterns
    if normal:
        return ABSENT, "", []
    return UNPARSEABLE, "the answer does not describe wall motion", []


def parse_answer(task: Task | str, text: Any) -> Finding:
    """Structured finding from a model answer; never raises on malformed output."""
    if isinstance(task, str):
        task = get_task(task)
    base = dict(task_id=task.id, catalog_version=task.catalog_version)
    if not isinstance(text, str) or not text.strip():
        return Finding(status=UNPARSEABLE, text="" if text is None else str(text),
                       reason="empty or non-text answer", **base)
    try:
        lowered = " ".join(text.lower().split())
        clauses = _clauses(lowered)
        grade = None
        patterns: list[str] = []
        if task.answer_type == "wall_motion":
            status, reason, patterns = _wall_motion(clauses)
            grade = patterns[0] if patterns else None
        else:
            status, reason = _presence(task.id, clauses)
            if status == PRESENT:
                for name, rx in _GRADES.get(task.id, []):
                    if any(rx.search(c) and _SUBJECT[task.id].search(c) for c in clauses):
                        grade = name
                        break
                if task.id == "lge":
                    patterns = [n for n, rx in _LGE_PATTERNS
                                if any(rx.search(c) and not _NEGATION.search(c) for c in clauses)]
        segments = parse_segments(lowered) if status == PRESENT and task.answer_type != "presence_grade" else []
        return Finding(status=status, grade=grade, segments=segments, patterns=patterns, text=text,
                       reason=reason, **base)
    except Exception as exc:  # a parser bug must not take the report down
        return Finding(status=UNPARSEABLE, text=text, reason=f"parser error: {exc!r}", **base)
