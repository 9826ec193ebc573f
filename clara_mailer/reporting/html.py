"""The HTML report: one self-contained page (no network, no JavaScript) with inline SVG,
returned as a string (the caller decides where it goes).

The chart geometry (every bar's position and size) is computed here; the page template
``templates/report/report.html.j2`` only places it, with Jinja autoescape on, so a reply
text or a segment name can never become markup.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jinja2

from clara_mailer.core.resources import REPORT_TEMPLATES
from clara_mailer.core.vocabulary import Status
from clara_mailer.reporting.report import TOP_FAILURES, CampaignReport, Timeline, percent

#: One colour per state, distinguishable in print (with the legend and labels).
COLOURS = {
    Status.SENT: "#2e7d32",
    Status.DEFERRED: "#f9a825",
    Status.FAILED: "#c62828",
    Status.BOUNCED: "#6a1b9a",
    Status.UNKNOWN: "#546e7a",
    Status.SKIPPED: "#90a4ae",
    Status.QUEUED: "#1565c0",
    Status.SENDING: "#4fc3f7",
}

CHART_WIDTH = 760
LABEL_WIDTH = 190
BAR_HEIGHT = 26
GAP = 10


@dataclass(frozen=True)
class Bar:
    """One rectangle of a chart, with what it stands for (shown as a tooltip)."""

    x: float
    y: float
    width: float
    height: float
    colour: str
    title: str
    kind: str  # status or series name, for styling and tests


@dataclass(frozen=True)
class Label:
    x: float
    y: float
    text: str
    anchor: str = "start"


@dataclass(frozen=True)
class Chart:
    name: str
    title: str
    width: float
    height: float
    bars: list[Bar]
    labels: list[Label]


def segment_chart(report: CampaignReport) -> Chart:
    """Outcomes per segment: one stacked bar per segment, lengths to one scale."""
    statuses = report.shown_statuses()
    rows = sorted(report.segments.items())
    biggest = max((sum(c.values()) for _, c in rows), default=0) or 1
    span = CHART_WIDTH - LABEL_WIDTH - 60
    bars: list[Bar] = []
    labels: list[Label] = []
    for i, (segment, counts) in enumerate(rows):
        y = GAP + i * (BAR_HEIGHT + GAP)
        total = sum(counts.values())
        labels.append(Label(LABEL_WIDTH - 8, y + BAR_HEIGHT * 0.68, segment or "(none)", "end"))
        x = float(LABEL_WIDTH)
        for status in statuses:
            n = counts.get(status, 0)
            if not n:
                continue
            width = span * n / biggest
            title = f"{segment}: {n} {status} ({percent(n, total)})"
            bars.append(Bar(x, y, width, BAR_HEIGHT, COLOURS[status], title, status))
            x += width
        labels.append(Label(x + 6, y + BAR_HEIGHT * 0.68, str(total)))
    height = GAP + len(rows) * (BAR_HEIGHT + GAP)
    return Chart("segments", "Outcomes per segment", CHART_WIDTH, height, bars, labels)


def timeline_chart(timeline: Timeline) -> Chart:
    """Messages accepted per minute/hour/day: one column per period, gaps included."""
    points = timeline.points
    left, top, plot_h = 50.0, 10.0, 160.0
    plot_w = CHART_WIDTH - left - 10
    peak = max((n for _, n in points), default=0) or 1
    step = plot_w / max(len(points), 1)
    bars: list[Bar] = []
    labels = [
        Label(left - 6, top + 10, str(peak), "end"),
        Label(left - 6, top + plot_h, "0", "end"),
    ]
    for i, (at, n) in enumerate(points):
        if not n:
            continue
        h = plot_h * n / peak
        width = min(max(step * 0.8, 1.0), 40.0)
        x = left + i * step + (step - width) / 2
        title = f"{at}: {n}"
        bars.append(Bar(x, top + plot_h - h, width, h, COLOURS[Status.SENT], title, Status.SENT))
    if points:
        bottom = top + plot_h + 16
        labels.append(Label(left, bottom, points[0][0]))
        if len(points) > 1:
            labels.append(Label(CHART_WIDTH - 10, bottom, points[-1][0], "end"))
    title = f"Messages accepted per {timeline.unit} (UTC)"
    return Chart("timeline", title, CHART_WIDTH, top + plot_h + 24, bars, labels)


def failure_chart(report: CampaignReport) -> Chart:
    """The most common problem replies, one bar each, longest first."""
    groups = report.failures
    biggest = max((f.count for f in groups), default=0) or 1
    span = CHART_WIDTH - 80
    bars: list[Bar] = []
    labels: list[Label] = []
    row_h = BAR_HEIGHT + 16 + GAP
    for i, f in enumerate(groups):
        y = GAP + i * row_h
        code = "" if f.code is None or f.reply.startswith(str(f.code)) else f"{f.code} "
        text = f"{f.status}: {code}{f.reply}"
        labels.append(Label(0, y + 12, text[:110] + ("…" if len(text) > 110 else "")))
        width = span * f.count / biggest
        bars.append(Bar(0, y + 16, width, BAR_HEIGHT - 6, COLOURS[f.status], text, f.status))
        labels.append(Label(width + 6, y + 16 + (BAR_HEIGHT - 6) * 0.75, str(f.count)))
    height = GAP + len(groups) * row_h
    return Chart(
        "failures",
        f"Most common problem replies (top {TOP_FAILURES})",
        CHART_WIDTH,
        height,
        bars,
        labels,
    )


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(REPORT_TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_html(report: CampaignReport, rows: Iterable[Mapping[str, Any]] | None = None) -> str:
    """The whole page as text; ``rows`` (a ``--status`` listing) adds a recipients table."""
    statuses = report.shown_statuses()
    charts = [segment_chart(report), failure_chart(report)]
    if report.timeline is not None:
        charts.insert(1, timeline_chart(report.timeline))
    return (
        _environment()
        .get_template("report.html.j2")
        .render(
            r=report,
            statuses=statuses,
            all_statuses=list(Status),
            colours=COLOURS,
            percent=percent,
            charts=charts,
            recipients=list(rows) if rows is not None else None,
        )
    )
