"""``simulate --html PATH``: priced simulations of one or more policies as one HTML file that works offline.

Nothing is fetched when the file is opened: no script at all, no font, stylesheet or image from elsewhere. The
charts are SVG drawn here and inlined; each bar carries its figure in ``data-value`` and in a tooltip.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence

from hybrid_router.router.policy import format_duration
from hybrid_router.router.simulate import SimulationReport, format_dollars

# Colour-blind-safe (Okabe-Ito), in the order executors are first met
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
CHART_WIDTH = 760
LABEL_WIDTH = 220
VALUE_WIDTH = 110
BAR_HEIGHT = 26
BAR_GAP = 14
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 860px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { padding: .25em .8em; text-align: right; border-bottom: 1px solid #ddd; }
th:first-child, td:first-child { text-align: left; }
.chart text { font: 12px system-ui, sans-serif; fill: #222; }
.notes li { margin: .2em 0; }
.small { color: #555; font-size: .9em; }
"""

Segments = list[tuple[str, float]]


def render_html(reports: Sequence[SimulationReport]) -> str:
    """The whole document for ``reports`` (priced, on the same task table)."""
    first = reports[0]
    prices = first.prices or {}
    colours = _colours(reports)
    names = [report.policy_file for report in reports]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_text('Routing simulation: ' + ' vs '.join(names))}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{_text(' vs '.join(names))}</h1>",
        f"<p>{first.tasks:,} task runs ({first.rows:,} rows) from {_text(first.source)}. Prices: AWS list "
        f"prices for {_text(str(prices.get('region')))} taken {_text(str(prices.get('taken')))}.</p>",
        _summary_table(reports),
        "<h2>Cost in dollars</h2>",
        _stacked_chart("cost_usd", reports, colours, lambda load: load.cost_usd, _dollars),
        "<h2>Task-hours</h2>",
        _stacked_chart("task_hours", reports, colours, lambda load: load.task_hours, lambda v: f"{v:,.2f} h"),
        "<h2>Start latency, all runs together</h2>",
        _stacked_chart(
            "start_latency_s", reports, colours, lambda load: load.start_latency_s, format_duration
        ),
        "<h2>Fallbacks expected from measured failures</h2>",
        _chart(
            "fallbacks",
            [(report.policy_file, sorted(report.fallbacks_by_reason.items())) for report in reports],
            _colours_of(sorted({r for report in reports for r in report.fallbacks_by_reason})),
            lambda value: f"{value:,.1f}",
        ),
    ]
    for report in reports:
        parts += [f"<h2>{_text(report.policy_file)}: by executor</h2>", _executor_table(report)]
    notes = list(dict.fromkeys(note for report in reports for note in report.notes))
    if notes:
        parts += [
            "<h2>How each executor was priced</h2>",
            '<ul class="notes">' + "".join(f"<li>{_text(note)}</li>" for note in notes) + "</ul>",
        ]
    sources = prices.get("sources") or []
    if sources:
        # plain text on purpose: the report links to nothing
        parts.append(f'<p class="small">Price sources: {_text(", ".join(sources))}</p>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _summary_table(reports: Sequence[SimulationReport]) -> str:
    rows = [
        ("tasks", lambda r: f"{r.tasks:,}"),
        ("task-hours", lambda r: f"{r.task_hours:,.2f}"),
        ("cost $", lambda r: _dollars(r.cost_usd)),
        ("start latency", lambda r: format_duration(r.start_latency_s)),
        ("fallbacks", lambda r: f"{r.fallbacks:,.1f}"),
        ("failed tries", lambda r: f"{r.failed_tries:,.1f}"),
    ]
    head = "".join(f"<th>{_text(report.policy_file)}</th>" for report in reports)
    body = "".join(
        f"<tr><td>{label}</td>" + "".join(f"<td>{show(report)}</td>" for report in reports) + "</tr>"
        for label, show in rows
    )
    return f'<table class="summary"><tr><th></th>{head}</tr>{body}</table>'


def _executor_table(report: SimulationReport) -> str:
    head = "".join(
        f"<th>{label}</th>"
        for label in ("executor", "tasks", "task-hours", "cost $", "start latency", "fallback runs")
    )
    body = "".join(
        f"<tr><td>{_text(name)}</td><td>{load.tasks:,}</td><td>{load.task_hours:,.2f}</td>"
        f"<td>{_dollars(load.cost_usd)}</td><td>{format_duration(load.start_latency_s)}</td>"
        f"<td>{load.fallback_runs:,.1f}</td></tr>"
        for name, load in sorted(report.executors.items())
    )
    return f"<table>{head}{body}</table>"


def _stacked_chart(
    metric: str,
    reports: Sequence[SimulationReport],
    colours: dict[str, str],
    value: Callable,
    show: Callable[[float], str],
) -> str:
    bars = [
        (report.policy_file, [(name, value(load)) for name, load in sorted(report.executors.items())])
        for report in reports
    ]
    return _chart(metric, bars, colours, show)


def _chart(
    metric: str, bars: list[tuple[str, Segments]], colours: dict[str, str], show: Callable[[float], str]
) -> str:
    """Horizontal bars, one per policy, each stacked by executor (or reason), with a legend below."""
    scale = max((sum(value for _, value in segments) for _, segments in bars), default=0.0)
    span = CHART_WIDTH - LABEL_WIDTH - VALUE_WIDTH
    legend_y = len(bars) * (BAR_HEIGHT + BAR_GAP) + BAR_GAP
    height = legend_y + 24
    shapes = []
    for row, (label, segments) in enumerate(bars):
        y = BAR_GAP + row * (BAR_HEIGHT + BAR_GAP)
        shapes.append(f'<text x="0" y="{y + BAR_HEIGHT * 0.65:.1f}">{_text(_shorten(label))}</text>')
        x = float(LABEL_WIDTH)
        for name, value in segments:
            width = span * value / scale if scale > 0 else 0.0
            shapes.append(
                f'<rect x="{x:.2f}" y="{y}" width="{width:.2f}" height="{BAR_HEIGHT}" '
                f'fill="{colours[name]}" data-series="{_text(name)}" data-value="{value!r}">'
                f"<title>{_text(f'{label}: {name} {show(value)}')}</title></rect>"
            )
            x += width
        total = sum(value for _, value in segments)
        shapes.append(
            f'<text x="{x + 6:.2f}" y="{y + BAR_HEIGHT * 0.65:.1f}" data-total="{total!r}">{_text(show(total))}</text>'
        )
    x = float(LABEL_WIDTH)
    for name, colour in colours.items():
        shapes.append(f'<rect x="{x:.1f}" y="{legend_y}" width="12" height="12" fill="{colour}"/>')
        shapes.append(f'<text x="{x + 16:.1f}" y="{legend_y + 10}">{_text(name)}</text>')
        x += 24 + 8 * len(name)
    return (
        f'<svg class="chart" data-metric="{metric}" width="{CHART_WIDTH}" height="{height}" '
        f'viewBox="0 0 {CHART_WIDTH} {height}" role="img" aria-label="{_text(metric)}">'
        + "".join(shapes)
        + "</svg>"
    )


def _colours(reports: Sequence[SimulationReport]) -> dict[str, str]:
    return _colours_of(sorted({name for report in reports for name in report.executors}))


def _colours_of(names: Sequence[str]) -> dict[str, str]:
    return {name: PALETTE[index % len(PALETTE)] for index, name in enumerate(names)}


def _shorten(label: str, width: int = 30) -> str:
    return label if len(label) <= width else "..." + label[-(width - 3) :]


def _dollars(amount: float) -> str:
    return f"${format_dollars(amount)}"


def _text(value: str) -> str:
    return html.escape(value, quote=True)
