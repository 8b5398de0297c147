"""The one-page PDF draft (issue 16): what a cardiologist reads before signing, printable on A4.

    pdf = render_pdf(report, contours_png, volumes_png, thumbnails={"pericardial_effusion": [img, ...]})

Drawn with matplotlib's PDF backend (headless, no pyplot), TrueType fonts embedded (pdf.fonttype
42: DejaVu Sans, shipped with matplotlib, so every machine renders the same page and a reader
can search and copy the text). One page, top to bottom: header (patient, study, models, the
"machine generated draft" warning), measurements with normal ranges and flags next to the volume
curves, the contour mosaic, the findings with the thumbnails of the images each question was
asked on ("no images" where none are stored), and the quality section. What does not fit on the
page (a long quality list) is cut with a line saying how much more report.json holds. Numbers are
formatted as in report.txt (one decimal), from the same report document.
"""

from __future__ import annotations

import functools
import io
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

PAGE_IN = (8.27, 11.69)  # A4 portrait; fits US Letter's width too (8.5 in)
MARGIN_IN = 0.45
BODY_PT, SMALL_PT = 7.5, 6.5
DRAFT = "MACHINE GENERATED DRAFT - not reviewed, not signed"


FONT_FAMILY = "CMRVL Sans"


@functools.lru_cache(maxsize=1)
def _page_fonts() -> str:
    """Register DejaVu Sans (regular, bold) cut down to Latin text as the family "CMRVL Sans".

    matplotlib subsets every embedded TrueType font at each save; on the whole DejaVu Sans (6000
    glyphs with their layout tables) that is most of the PDF's time. Cut once per process, it
    is a small font; characters outside it fall back to the whole DejaVu Sans (font.family)."""
    import tempfile

    from fontTools import subset
    from fontTools.ttLib import TTFont
    from matplotlib import font_manager

    folder = tempfile.mkdtemp(prefix="cmrvl-fonts-")
    text = [*range(0x20, 0x250), *range(0x2010, 0x2060), 0x2190, 0x2192, 0x2264, 0x2265]
    for weight in ("normal", "bold"):
        font = TTFont(font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans", weight=weight)))
        options = subset.Options(glyph_names=True, notdef_outline=True, name_IDs=["*"], name_languages=["*"],
                                 layout_features=[])
        options.drop_tables += ["GSUB", "GPOS", "GDEF", "FFTM"]
        subsetter = subset.Subsetter(options)
        subsetter.populate(unicodes=text)
        subsetter.subset(font)
        style = "Bold" if weight == "bold" else "Book"
        for record in font["name"].names:  # its own family name, so that it never replaces DejaVu Sans
            if record.nameID in (1, 16):
                record.string = FONT_FAMILY
            elif record.nameID == 4:
                record.string = f"{FONT_FAMILY} {style}"
            elif record.nameID == 6:
                record.string = f"CMRVLSans-{style}"
        path = f"{folder}/CMRVLSans-{style}.ttf"
        font.save(path)
        font_manager.fontManager.addfont(path)
    return FONT_FAMILY


def _chars(width_in: float, size_pt: float) -> int:
    """About how many DejaVu Sans characters fit in a line (average advance ~0.55 em)."""
    return max(20, int(width_in * 72 / (size_pt * 0.55)))


def _value(d: Mapping[str, Any]) -> str:
    return "-" if d["value"] is None else f"{d['value']:.1f}"


def _range(d: Mapping[str, Any]) -> str:
    rng = d.get("normal_range")
    return f"{rng['low']}-{rng['high']}" if rng else ""


def measurement_rows(report: Mapping[str, Any]) -> tuple[list[tuple[str, str, str, str, str]], dict[str, list[str]],
                                                         dict[str, list[str]]]:
    """(label, value, unit, normal range, flag) of each measured value; the values left null for a
    reason, grouped by that reason's code (what report.txt lists as "not measured"); and the values
    measured but doubted by a quality flag, by its code (their flag cell ends in "*")."""
    rows, not_measured, doubtful = [], {}, {}
    for d in report.get("measurement_details", {}).values():
        if d["value"] is None:
            if d.get("reason"):
                not_measured.setdefault(d["reason"]["code"], []).append(d["label"])
            continue
        flag = {"low": "LOW", "high": "HIGH"}.get(d.get("assessment") or "", "")
        for caveat in d.get("caveats", []):
            doubtful.setdefault(caveat["code"], []).append(d["label"])
        rows.append((d["label"], _value(d), d["unit"], _range(d), f"{flag} *".strip() if d.get("caveats") else flag))
    return rows, not_measured, doubtful


def _model_line(report: Mapping[str, Any]) -> str:
    parts = []
    for role, label in (("segmentation", "Segmentation"), ("vlm", "Findings")):
        model = (report.get("models") or {}).get(role)
        if not model:
            parts.append(f"{label}: none")
            continue
        extra = [model.get("backend") or ""] + (["shipped default LV-only model"] if model.get("default_model") else [])
        extra_text = ", ".join(e for e in extra if e)
        parts.append(f"{label}: {model.get('name')} {model.get('version')}"
                     + (f" ({extra_text})" if extra_text else ""))
    return "Models: " + "; ".join(parts)


def _finding_text(finding: Mapping[str, Any]) -> str:
    title = finding.get("title") or finding.get("task_id", "")
    if finding.get("status") == "ok":
        answer = finding.get("summary") or finding.get("answer", "")
    else:
        answer = f"[{finding.get('status', 'error')}] {finding.get('error') or finding.get('answer') or ''}"
    return f"{title}: {' '.join(str(answer).split())}"


def _image(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


class _Page:
    """A top-down cursor over one matplotlib figure, in inches from the top-left corner."""

    def __init__(self):
        from matplotlib.figure import Figure

        self.fig = Figure(figsize=PAGE_IN, facecolor="white")
        self.y = MARGIN_IN
        self.width = PAGE_IN[0] - 2 * MARGIN_IN

    def text(self, x_in: float, y_in: float, text: str, size: float = BODY_PT, **kw):
        return self.fig.text(x_in / PAGE_IN[0], 1 - y_in / PAGE_IN[1], text, fontsize=size, va="top", **kw)

    def line(self, text: str, size: float = BODY_PT, x_in: float = MARGIN_IN, **kw) -> None:
        self.text(x_in, self.y, text, size, **kw)
        self.y += size * 1.35 / 72

    def heading(self, text: str) -> None:
        self.y += 0.06
        self.line(text, 9, fontweight="bold")
        self.fig.add_artist(_rule(self.y - 0.03))

    def picture(self, x_in: float, y_in: float, w_in: float, h_in: float, pixels: np.ndarray) -> None:
        ax = self.fig.add_axes((x_in / PAGE_IN[0], 1 - (y_in + h_in) / PAGE_IN[1],
                                w_in / PAGE_IN[0], h_in / PAGE_IN[1]))
        ax.imshow(pixels, interpolation="none")  # embedded at full resolution, not resampled
        ax.set_axis_off()

    def left_in(self) -> float:
        return PAGE_IN[1] - MARGIN_IN - self.y


def _rule(y_in: float):
    from matplotlib.lines import Line2D

    y = 1 - y_in / PAGE_IN[1]
    return Line2D([MARGIN_IN / PAGE_IN[0], 1 - MARGIN_IN / PAGE_IN[0]], [y, y], color="#888888", linewidth=0.5)


def render_pdf(
    report: Mapping[str, Any],
    contours_png: bytes | None = None,
    volumes_png: bytes | None = None,
    thumbnails: Mapping[str, Sequence[np.ndarray]] | None = None,
) -> bytes:
    """The report document (cmrvl.report/v1) as a one-page PDF; returns the PDF bytes.

    thumbnails: per findings task id, the images (RGB arrays) the question was asked on; a task
    missing here is shown with "no images"."""
    import matplotlib

    thumbnails = thumbnails or {}
    with matplotlib.rc_context({"pdf.fonttype": 42, "font.family": [_page_fonts(), "DejaVu Sans"]}):
        page = _Page()
        _header(page, report)
        _measurements_and_curves(page, report, volumes_png)
        if contours_png is not None:
            pixels = _image(contours_png)
            h = page.width * pixels.shape[0] / pixels.shape[1]
            page.heading("CONTOURS (ED and ES, base to apex)")
            page.picture(MARGIN_IN, page.y, page.width, h, pixels)
            page.y += h + 0.05
        _findings(page, report, thumbnails)
        _quality(page, report)
        buffer = io.BytesIO()
        study = report.get("study", {})
        # No creation date: the same report gives the same bytes (a retried stage, the same UIDs).
        page.fig.savefig(buffer, format="pdf", metadata={
            "Title": f"CMR draft report {study.get('patient_id') or ''} {study.get('study_date') or ''}".strip(),
            "Author": "CMR-VL (machine generated draft)", "Subject": study.get("study_instance_uid", ""),
            "Creator": "CMR-VL", "Producer": "CMR-VL (matplotlib)", "CreationDate": None})
    return buffer.getvalue()


def _header(page: _Page, report: Mapping[str, Any]) -> None:
    study = report.get("study", {})
    page.line("CARDIAC MRI - DRAFT REPORT", 14, fontweight="bold")
    page.text(PAGE_IN[0] - MARGIN_IN, MARGIN_IN + 0.02, DRAFT, 8, ha="right", color="white", fontweight="bold",
              bbox={"facecolor": "#B00020", "edgecolor": "none", "pad": 3})
    page.y += 0.04
    page.line(f"Patient ID: {study.get('patient_id') or '-'}     Study date: {study.get('study_date') or '-'}     "
              f"Accession: {study.get('accession_number') or '-'}     Status: {report.get('status', '-')}", 8.5)
    page.line(f"Study UID: {study.get('study_instance_uid') or '-'}     Run: {study.get('study_id') or '-'}     "
              f"Generated: {report.get('generated_at') or '-'}", SMALL_PT)
    page.line(_model_line(report), SMALL_PT)
    page.line("For radiologist review: check every contour and the volume curve before signing; values are "
              "computed by the models named above.", SMALL_PT, color="#B00020")


def _measurements_and_curves(page: _Page, report: Mapping[str, Any], volumes_png: bytes | None) -> None:
    page.heading("MEASUREMENTS")
    top = page.y
    table_w = 3.9
    columns = (0.0, 1.7, 2.2, 2.65, 3.3)  # label, value (right-aligned end), unit, range, flag
    rows, not_measured, doubtful = measurement_rows(report)
    for row_index, row in enumerate([("Measurement", "Value", "Unit", "Normal", "Flag"), *rows]):
        for col, (x, cell) in enumerate(zip(columns, row)):
            abnormal = col == 4 and cell.split(" ")[0] in ("LOW", "HIGH")
            kw = {"fontweight": "bold"} if row_index == 0 or abnormal else {}
            if abnormal:
                kw["color"] = "#B00020"
            if col == 1:
                page.text(MARGIN_IN + x + 0.45, page.y, cell, BODY_PT, ha="right", **kw)
            else:
                page.text(MARGIN_IN + x, page.y, cell, BODY_PT, **kw)
        page.y += BODY_PT * 1.4 / 72
    if not rows and not not_measured:
        page.line("not available (no segmentation)")
    for code, labels in not_measured.items():
        for line in textwrap.wrap(f"Not measured ({code}, see QUALITY): {', '.join(labels)}",
                                  _chars(table_w - 0.1, SMALL_PT), subsequent_indent="   "):
            page.line(line, SMALL_PT)
    if doubtful:  # one line: the rows carry the mark, the QUALITY section the reasons
        for line in textwrap.wrap(f"* Doubted by quality flags (see QUALITY): {', '.join(sorted(doubtful))}",
                                  _chars(table_w - 0.1, SMALL_PT), subsequent_indent="   "):
            page.line(line, SMALL_PT)
    m = report.get("measurements", {})
    if m.get("ed_phase") is not None:
        es = m.get("es_phase")
        note = (f"ED phase {m['ed_phase']}, ES phase {'-' if es is None else es} (0-based, by trigger time)"
                + ("" if m.get("bsa_m2") else "; no height/weight given: no indexed values"))
        for line in textwrap.wrap(note, _chars(table_w - 0.1, SMALL_PT)):
            page.line(line, SMALL_PT)
    table_bottom = page.y
    if volumes_png is not None:
        pixels = _image(volumes_png)
        w = page.width - table_w
        h = w * pixels.shape[0] / pixels.shape[1]
        page.picture(MARGIN_IN + table_w, top - 0.05, w, h, pixels)
        page.y = max(table_bottom, top - 0.05 + h)
    page.y += 0.04


def _findings(page: _Page, report: Mapping[str, Any], thumbnails: Mapping[str, Sequence[np.ndarray]]) -> None:
    page.heading("FINDINGS")
    findings = report.get("findings") or []
    if not findings:
        page.line("not available (no vision-language findings)")
    thumb_in, max_thumbs = 0.62, 6
    text_w = page.width - max_thumbs * (thumb_in + 0.03) - 0.1
    for finding in findings:
        stored = list(thumbnails.get(finding.get("task_id", ""), []))
        images = stored[:max_thumbs]
        lines = textwrap.wrap(_finding_text(finding), _chars(text_w, BODY_PT))[:4]
        row_top = page.y
        for line in lines:
            page.line(line)
        if len(stored) > len(images):
            page.line(f"asked on {len(stored)} images; the first {len(images)} are shown", SMALL_PT, color="#666666")
        if not images:
            page.line("no images", SMALL_PT, color="#666666")
        x = MARGIN_IN + text_w + 0.1
        for image in images:
            page.picture(x, row_top, thumb_in, thumb_in, np.asarray(image))
            x += thumb_in + 0.03
        page.y = max(page.y, row_top + (thumb_in + 0.04 if images else 0)) + 0.03


def _quality(page: _Page, report: Mapping[str, Any]) -> None:
    quality = report.get("quality") or []
    page.heading("QUALITY")
    if not quality:
        page.line("no quality issues recorded")
        return
    line_in = SMALL_PT * 1.3 / 72
    for i, q in enumerate(quality):
        lines = textwrap.wrap(f"- {q['code']} ({q.get('source', '')}): {q['message']}", _chars(page.width, SMALL_PT),
                              subsequent_indent="   ")
        rest = len(quality) - i
        if page.left_in() < (len(lines) + 1) * line_in:
            fits = int(page.left_in() / line_in) - 1
            if fits >= 2:  # the start of this entry, then say what is left out
                for line in lines[:fits - 1]:
                    page.line(line, SMALL_PT)
                page.line(f"   ... (cut: this and {rest - 1} more quality entr{'y' if rest == 2 else 'ies'} in full "
                          "in report.json / report.txt)", SMALL_PT, color="#B00020")
            else:
                page.line(f"... {rest} more quality entr{'y' if rest == 1 else 'ies'} in report.json / report.txt",
                          SMALL_PT, color="#B00020")
            return
        for line in lines:
            page.line(line, SMALL_PT)


__all__ = ["DRAFT", "measurement_rows", "render_pdf"]
