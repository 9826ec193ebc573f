"""The HTML report opened in headless Chromium: the charts are drawn, bar by bar."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import Result

from clara_mailer.core.settings import Settings
from clara_mailer.store.database import Database
from tests.browser import CHROMIUM, CHROMIUM_ARGS, needs_chromium
from tests.report_helpers import NEWSLETTER, build_newsletter_log

BARS_JS = """() => Array.from(document.querySelectorAll('svg.chart')).map(svg => ({
    chart: svg.dataset.chart,
    box: svg.getBoundingClientRect().toJSON(),
    bars: Array.from(svg.querySelectorAll('rect.bar')).map(r => ({
        kind: r.dataset.kind, title: r.querySelector('title').textContent,
        box: r.getBoundingClientRect().toJSON()}))}))"""


@pytest.mark.browser
@needs_chromium
def test_html_report_draws_its_charts_in_chromium(
    db: Database, settings: Settings, cli: Callable[..., Result], tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    log = build_newsletter_log(db, settings, tmp_path)
    page_path = tmp_path / "report.html"
    assert cli("report", NEWSLETTER, "--format", "html", "-o", str(page_path)).exit_code == 0
    figures = json.loads(cli("report", NEWSLETTER, "--format", "json").stdout)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 1200})
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_path.as_uri())
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
            charts = {c["chart"]: c for c in page.evaluate(BARS_JS)}
            page.emulate_media(media="print")
            page.pdf(path=str(tmp_path / "report.pdf"))
        finally:
            browser.close()

    assert requests == [page_path.as_uri()]  # nothing fetched from anywhere else
    assert set(charts) == {"segments", "timeline", "failures"}
    for chart in charts.values():
        assert chart["box"]["width"] > 0 and chart["box"]["height"] > 0
        for bar in chart["bars"]:
            assert bar["box"]["width"] > 0 and bar["box"]["height"] > 0, (chart["chart"], bar)

    # Stacked bars: one rect per (segment, status) that occurs, widths in proportion.
    segment_bars = charts["segments"]["bars"]
    expected = {
        (seg, st): n for seg, counts in log.expected_segments().items() for st, n in counts.items()
    }
    assert len(segment_bars) == len(expected)
    sent = {
        b["title"].split(":")[0]: b["box"]["width"] for b in segment_bars if b["kind"] == "sent"
    }
    ratio = sent["local-police"] / sent["associations"]
    assert ratio == pytest.approx(
        expected[("local-police", "sent")] / expected[("associations", "sent")], rel=0.02
    )
    # The police bar is longer in total, as it has three times the deliveries.
    police = sum(b["box"]["width"] for b in segment_bars if b["title"].startswith("local-police"))
    assoc = sum(b["box"]["width"] for b in segment_bars if b["title"].startswith("associations"))
    assert police == pytest.approx(
        assoc * len(log.addresses["local-police"]) / len(log.addresses["associations"]), rel=0.02
    )

    assert len(charts["failures"]["bars"]) == len(figures["failures"])
    timeline_total = sum(int(b["title"].rsplit(": ", 1)[1]) for b in charts["timeline"]["bars"])
    assert timeline_total == sum(log.accepted.values())
    assert (tmp_path / "report.pdf").stat().st_size > 10_000
