"""`luodi bench --html`: the report as one self-contained HTML file. Every plot is SVG written here (no script, no
plotting library, no font or stylesheet from elsewhere); a Content-Security-Policy of ``default-src 'none'`` makes
the browser refuse any request the file might still make.

Plots: latency distribution per target (box: p25-p75, median; whiskers min-p99; max as a dot; and a histogram per
target), throughput against batch size and against concurrency, accuracy against latency with the Pareto front,
peak memory, and the per-operator profile. Each data point is an SVG element with ``class="point"`` and
``data-target``; each plot has the per-target legend.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")
W, H = 720, 300
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 20, 45

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}
td:first-child,th:first-child{text-align:left} .note{color:#666;font-size:.85em}
.legend{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:14px;font-size:.9em}
.legend li span{display:inline-block;width:12px;height:12px;margin-right:5px;vertical-align:middle}
svg text{font-size:11px;fill:#333} svg .axis{stroke:#888} svg .grid{stroke:#eee}
"""


def _n(value: float) -> str:
    return f"{value:.1f}"


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.3g}"
    return f"{value:.2g}"


class Axis:
    """A linear or log10 scale from data to pixels."""

    def __init__(self, lo: float, hi: float, a: float, b: float, log: bool = False) -> None:
        if log:
            lo, hi = max(lo, 1e-12), max(hi, 1e-12)
        if hi <= lo:
            hi = lo * 1.5 if lo > 0 else lo + 1
        self.lo, self.hi, self.a, self.b, self.log = lo, hi, a, b, log

    def __call__(self, v: float) -> float:
        if self.log:
            v = max(v, 1e-12)
            t = (math.log10(v) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        else:
            t = (v - self.lo) / (self.hi - self.lo)
        return self.a + t * (self.b - self.a)

    def ticks(self, n: int = 5) -> list[float]:
        if self.log:
            lo, hi = math.floor(math.log10(self.lo)), math.ceil(math.log10(self.hi))
            return [10.0**e for e in range(lo, hi + 1) if self.lo <= 10.0**e <= self.hi] or [self.lo, self.hi]
        raw = (self.hi - self.lo) / n
        power = 10.0 ** math.floor(math.log10(raw))
        step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)  # 1, 2, 2.5 or 5 times a power of 10
        first = math.ceil(self.lo / step - 1e-9) * step
        return [first + i * step for i in range(int((self.hi - first) / step + 1e-9) + 1)]


def _svg(chart_id: str, body: list[str], title: str, height: int = H) -> str:
    return (
        f'<svg class="chart" id="{chart_id}" width="{W}" height="{height}" viewBox="0 0 {W} {height}" '
        f'xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{escape(title)}">' + "".join(body) + "</svg>"
    )


def _axes(x: Axis, y: Axis, xlabel: str, ylabel: str, height: int = H, xticks: list[float] | None = None) -> list[str]:
    out = []
    for t in y.ticks():
        py = _n(y(t))
        out.append(f'<line class="grid" x1="{LEFT}" x2="{W - RIGHT}" y1="{py}" y2="{py}"/>')
        out.append(f'<text x="{LEFT - 6}" y="{py}" text-anchor="end" dominant-baseline="middle">{_fmt(t)}</text>')
    for t in xticks if xticks is not None else x.ticks():
        px = _n(x(t))
        out.append(f'<text x="{px}" y="{height - BOTTOM + 16}" text-anchor="middle">{_fmt(t)}</text>')
    out.append(f'<line class="axis" x1="{LEFT}" x2="{W - RIGHT}" y1="{height - BOTTOM}" y2="{height - BOTTOM}"/>')
    out.append(f'<line class="axis" x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{height - BOTTOM}"/>')
    out.append(f'<text x="{(LEFT + W - RIGHT) / 2}" y="{height - 8}" text-anchor="middle">{escape(xlabel)}</text>')
    out.append(
        f'<text transform="translate(14,{(TOP + height - BOTTOM) / 2}) rotate(-90)" text-anchor="middle">'
        f"{escape(ylabel)}</text>"
    )
    return out


def _point(x: float, y: float, color: str, target: str, tip: str, r: float = 4, **data: Any) -> str:
    extra = "".join(f' data-{k}="{escape(str(v))}"' for k, v in data.items())
    return (
        f'<circle class="point" cx="{_n(x)}" cy="{_n(y)}" r="{r}" fill="{color}" data-target="{escape(target)}"{extra}>'
        f"<title>{escape(tip)}</title></circle>"
    )


def _legend(colors: dict[str, str]) -> str:
    items = "".join(
        f'<li data-target="{escape(n)}"><span style="background:{c}"></span>{escape(n)}</li>' for n, c in colors.items()
    )
    return f'<ul class="legend">{items}</ul>'


def _latency_boxes(report: dict[str, Any], colors: dict[str, str]) -> str:
    rows = [(t["target"], r) for t in report["targets"] for r in t["results"]]
    if not rows:
        return "<p>no latency was measured</p>"
    height = TOP + BOTTOM + 26 * len(rows)
    lo = min(r["min_ms"] for _, r in rows)
    hi = max(r["max_ms"] for _, r in rows)
    x = Axis(lo * 0.9, hi * 1.1, LEFT + 150, W - RIGHT, log=hi / max(lo, 1e-9) > 30)
    body = []
    for i, t in enumerate(x.ticks()):
        px = _n(x(t))
        body.append(f'<line class="grid" x1="{px}" x2="{px}" y1="{TOP}" y2="{height - BOTTOM}"/>')
        body.append(f'<text x="{px}" y="{height - BOTTOM + 16}" text-anchor="middle" data-i="{i}">{_fmt(t)}</text>')
    body.append(
        f'<text x="{(LEFT + 150 + W - RIGHT) / 2}" y="{height - 8}" text-anchor="middle">latency, ms'
        f"{' (log scale)' if x.log else ''}</text>"
    )
    for i, (name, r) in enumerate(rows):
        c = colors[name]
        cy = TOP + 13 + 26 * i
        tip = (
            f"{name} batch {r['batch']} x{r['concurrency']}: p50 {r['p50_ms']:.3f} p90 {r['p90_ms']:.3f} "
            f"p99 {r['p99_ms']:.3f} max {r['max_ms']:.3f} ms"
        )
        body.append(
            f'<text x="{LEFT + 144}" y="{cy}" text-anchor="end" dominant-baseline="middle">'
            f"{escape(name)} b{r['batch']} x{r['concurrency']}</text>"
        )
        body.append(
            f'<line x1="{_n(x(r["min_ms"]))}" x2="{_n(x(r["p99_ms"]))}" y1="{cy}" y2="{cy}" stroke="{c}"/>'
            f'<rect x="{_n(x(r["p25_ms"]))}" y="{cy - 8}" width="{_n(max(1.0, x(r["p75_ms"]) - x(r["p25_ms"])))}" '
            f'height="16" fill="{c}" fill-opacity=".35" stroke="{c}"><title>{escape(tip)}</title></rect>'
            f'<line x1="{_n(x(r["p50_ms"]))}" x2="{_n(x(r["p50_ms"]))}" y1="{cy - 8}" y2="{cy + 8}" stroke="{c}" '
            'stroke-width="2"/>'
        )
        body.append(_point(x(r["p50_ms"]), cy, c, name, tip, r=2.5, batch=r["batch"], value=r["p50_ms"]))
        body.append(_point(x(r["max_ms"]), cy, c, name, f"{name}: max {r['max_ms']:.3f} ms", r=2, stat="max"))
    return _svg("latency", body, "latency distribution per target", height)


def _histograms(report: dict[str, Any], colors: dict[str, str]) -> str:
    charts = []
    for t in report["targets"]:
        if not t["results"]:
            continue
        r = t["results"][0]
        edges, counts = r["histogram"]["edges_ms"], r["histogram"]["counts"]
        h = 160
        x = Axis(edges[0], edges[-1], LEFT, W - RIGHT)
        y = Axis(0, max(counts) or 1, h - BOTTOM, TOP)
        body = _axes(x, y, f"{t['target']}: latency at batch {r['batch']} x{r['concurrency']}, ms", "calls", h)
        c = colors[t["target"]]
        for lo, hi, n in zip(edges, edges[1:], counts):
            if n:
                body.append(
                    f'<rect class="point" data-target="{escape(t["target"])}" x="{_n(x(lo))}" y="{_n(y(n))}" '
                    f'width="{_n(max(1.0, x(hi) - x(lo) - 1))}" height="{_n(y(0) - y(n))}" fill="{c}">'
                    f"<title>{n} calls in {lo:.3f}-{hi:.3f} ms</title></rect>"
                )
        charts.append(_svg(f"histogram-{len(charts)}", body, f"latency histogram of {t['target']}", h))
    return "".join(charts)


def _lines(report: dict[str, Any], colors: dict[str, str], by: str, fixed: str, chart_id: str, xlabel: str) -> str:
    """Throughput against ``by`` (batch or concurrency), at the first value of ``fixed``."""
    series: dict[str, list[tuple[int, float]]] = {}
    for t in report["targets"]:
        if not t["results"]:
            continue
        first = t["results"][0][fixed]
        series[t["target"]] = sorted((r[by], r["throughput_per_s"]) for r in t["results"] if r[fixed] == first)
    values = sorted({v for pts in series.values() for v, _ in pts})
    if len(values) < 2:
        return f'<p class="note">one {by} size measured: give several (e.g. --{by} 1,4,16) to see the scaling</p>'
    x = Axis(min(values), max(values), LEFT + 10, W - RIGHT - 10, log=max(values) / min(values) >= 8)
    y = Axis(0, max(tp for pts in series.values() for _, tp in pts) * 1.1, H - BOTTOM, TOP)
    body = _axes(x, y, xlabel, "samples / s", xticks=values)
    for name, pts in series.items():
        c = colors[name]
        path = " ".join(f"{_n(x(v))},{_n(y(tp))}" for v, tp in pts)
        body.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="2"/>')
        for v, tp in pts:
            body.append(_point(x(v), y(tp), c, name, f"{name} {by} {v}: {tp:.1f} samples/s", **{by: v}))
    return _svg(chart_id, body, f"throughput against {by}")


def _pareto(report: dict[str, Any], colors: dict[str, str]) -> str:
    pts = {
        t["target"]: (t["results"][0]["p50_ms"], max(1e-12, 1.0 - t["accuracy"]["value"]), t["accuracy"]["metric"])
        for t in report["targets"]
        if t["results"] and t["accuracy"] is not None
    }
    if not pts:
        return '<p class="note">no target has an accuracy figure in the package (compiled without verification)</p>'
    lats = [p[0] for p in pts.values()]
    errs = [p[1] for p in pts.values()]
    wide = max(lats) / min(lats) > 10
    x = Axis(min(lats) * 0.8, max(lats) * 1.2, LEFT + 10, W - RIGHT - 90, log=wide)
    y = Axis(min(errs) / 3, max(errs) * 3, H - BOTTOM, TOP, log=True)
    xlabel = "median latency at the first batch size, ms" + (" (log scale)" if wide else "")
    body = _axes(x, y, xlabel, "1 − accuracy (log; lower is better)")
    front = [n for n in report["pareto"] if n in pts]
    if len(front) > 1:
        path = " ".join(f"{_n(x(pts[n][0]))},{_n(y(pts[n][1]))}" for n in front)
        body.append(f'<polyline class="front" points="{path}" fill="none" stroke="#444" stroke-dasharray="5,4"/>')
    for name, (lat, err, metric) in pts.items():
        on = name in front
        tip = f"{name}: {lat:.3f} ms, {metric} {1 - err:.8f}" + (" (Pareto front)" if on else "")
        body.append(_point(x(lat), y(err), colors[name], name, tip, r=6 if on else 4, pareto=str(on).lower()))
        body.append(f'<text x="{_n(x(lat) + 8)}" y="{_n(y(err) - 8)}">{escape(name)}</text>')
    return _svg("pareto", body, "accuracy against latency")


def _memory(report: dict[str, Any], colors: dict[str, str]) -> str:
    rows = [(t["target"], t["cold_start"]) for t in report["targets"] if (t["cold_start"] or {}).get("peak_rss_mb")]
    if not rows:
        return '<p class="note">no memory figure (run without --no-cold-start)</p>'
    height = TOP + BOTTOM + 28 * len(rows)
    x = Axis(0, max(c["peak_rss_mb"] for _, c in rows) * 1.1, LEFT + 150, W - RIGHT)
    body = []
    for t in x.ticks():
        body.append(f'<text x="{_n(x(t))}" y="{height - BOTTOM + 16}" text-anchor="middle">{_fmt(t)}</text>')
    body.append(
        f'<text x="{(LEFT + 150 + W - RIGHT) / 2}" y="{height - 8}" text-anchor="middle">peak resident MB of the '
        "target's own process (light: before the model was loaded)</text>"
    )
    for i, (name, c) in enumerate(rows):
        cy = TOP + 14 + 28 * i
        base = c.get("baseline_rss_mb") or 0.0
        peak = c["peak_rss_mb"]
        color = colors[name]
        body.append(
            f'<text x="{LEFT + 144}" y="{cy}" text-anchor="end" dominant-baseline="middle">{escape(name)}</text>'
        )
        body.append(
            f'<rect x="{_n(x(0))}" y="{cy - 9}" width="{_n(x(base) - x(0))}" height="18" fill="{color}" '
            'fill-opacity=".3"/>'
            f'<rect class="point" data-target="{escape(name)}" data-value="{peak:.1f}" x="{_n(x(base))}" y="{cy - 9}" '
            f'width="{_n(max(1.0, x(peak) - x(base)))}" height="18" fill="{color}"><title>{escape(name)}: peak '
            f"{peak:.1f} MB, {peak - base:.1f} MB after the imports</title></rect>"
        )
    return _svg("memory", body, "peak memory per target", height)


def _profiles(report: dict[str, Any], colors: dict[str, str]) -> str:
    parts = []
    for t in report["targets"]:
        prof = t["profile"]
        if prof is None:
            continue
        name = escape(t["target"])
        if not prof["ops"]:
            parts.append(f'<p class="note">{name}: {escape(prof.get("note") or "no profiler")}</p>')
            continue
        ops = prof["ops"]
        height = TOP + BOTTOM + 18 * len(ops)
        x = Axis(0, max(o["ms"] for o in ops) * 1.1, LEFT + 230, W - RIGHT)
        body = [
            f'<text x="{(LEFT + 230 + W - RIGHT) / 2}" y="{height - 8}" text-anchor="middle">{name}: ms per run '
            f"({escape(prof['profiler'] or '')}'s own profiler, top {len(ops)})</text>"
        ]
        for tick in x.ticks(4):
            body.append(f'<text x="{_n(x(tick))}" y="{height - BOTTOM + 16}" text-anchor="middle">{_fmt(tick)}</text>')
        for i, o in enumerate(ops):
            cy = TOP + 9 + 18 * i
            node = o["canonical"] or f"{o['node']} (engine's)"
            shown = node if len(node) <= 34 else "…" + node[-33:]
            body.append(
                f'<text x="{LEFT + 224}" y="{cy}" text-anchor="end" dominant-baseline="middle">'
                f"{escape(shown)} · {escape(o['op'])}</text>"
                f'<rect class="point" data-target="{name}" data-op="{escape(o["op"])}" x="{_n(x(0))}" y="{cy - 7}" '
                f'width="{_n(max(1.0, x(o["ms"]) - x(0)))}" height="14" fill="{colors[t["target"]]}">'
                f"<title>{escape(o['node'])} ({escape(o['op'])}{', ' + escape(o['kernel']) if o.get('kernel') else ''})"
                f": {o['ms']:.4f} ms, {o['percent']:.1f}%</title></rect>"
            )
        parts.append(_svg(f"profile-{len(parts)}", body, f"per-operator profile of {t['target']}", height))
    return "".join(parts) or '<p class="note">no profile (run with --profile)</p>'


def _table(report: dict[str, Any]) -> str:
    head = (
        "<tr><th>target</th><th>batch</th><th>streams</th><th>p50 ms</th><th>p90 ms</th><th>p99 ms</th>"
        "<th>max ms</th><th>samples/s</th><th>load ms</th><th>1st run ms</th><th>peak MB</th><th>size MB</th>"
        "<th>overhead µs</th><th>accuracy</th></tr>"
    )
    rows = []
    for t in report["targets"]:
        cold = t["cold_start"] or {}
        acc = t["accuracy"]
        over = t["overhead"] or {}
        if t["error"]:
            rows.append(f'<tr><td>{escape(t["target"])}</td><td colspan="13">{escape(t["error"])}</td></tr>')
        for r in t["results"]:
            cells = [
                escape(t["target"]),
                str(r["batch"]),
                str(r["concurrency"]),
                *(f"{r[k]:.3f}" for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms")),
                f"{r['throughput_per_s']:.1f}",
                f"{cold['load_ms']:.0f}" if "load_ms" in cold else "",
                f"{cold['first_inference_ms']:.1f}" if "first_inference_ms" in cold else "",
                f"{cold['peak_rss_mb']:.0f}" if cold.get("peak_rss_mb") else "",
                f"{t['artifact_bytes'] / 1e6:.2f}",
                f"{over['overhead_us']:.1f}" if "overhead_us" in over else "",
                "" if acc is None else f"{acc['value']:.6f} {acc['metric']}",
            ]
            rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def html(report: dict[str, Any]) -> str:
    """The report (``luodi.bench.bench``'s dict) as one HTML page that needs nothing but itself."""
    names = [t["target"] for t in report["targets"]]
    colors = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}
    legend = _legend(colors)
    model, host, settings = report["model"], report["host"], report["settings"]
    load = ", ".join(f"{v:.2f}" for v in host.get("load_average") or [])
    how = f"{settings['duration_s']} s" if settings.get("duration_s") is not None else f"{settings['iterations']} calls"
    shapes = "; ".join(f"{n}={'x'.join(map(str, d))}" for n, d in settings["shapes"].items())
    notes = "".join(f"<li>{escape(n)}</li>" for n in report.get("notes", []))
    notes += "".join(f"<li>not measured: {escape(s['target'])}: {escape(s['reason'])}</li>" for s in report["skipped"])
    sections = [
        ("Latency distribution", _latency_boxes(report, colors) + _histograms(report, colors)),
        (
            "Batch scaling",
            _lines(report, colors, "batch", "concurrency", "batch-scaling", "batch size")
            + _lines(report, colors, "concurrency", "batch", "concurrency-scaling", "streams sharing one session"),
        ),
        ("Accuracy against latency (Pareto front dashed)", _pareto(report, colors)),
        ("Memory", _memory(report, colors)),
        ("Per-operator profile", _profiles(report, colors)),
        ("All figures", _table(report)),
    ]
    body = "".join(
        f'<section id="s{i}"><h2>{escape(title)}</h2>{legend}{content}</section>'
        for i, (title, content) in enumerate(sections)
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>luodi bench: {escape(model["name"])}</title><style>{CSS}</style></head>
<body><h1>luodi bench: {escape(model["name"])}</h1>
<p class="note">{escape(report["created"])} · luodi {escape(report["luodi_version"])} · {escape(host["cpu"])},
{host["cores"]} cores, load average {escape(load)} · inputs {escape(shapes)} ({escape(settings.get("inputs_from", ""))})
· {escape(how)} per target per cell in {settings["rounds"]} interleaved rounds · threads
{settings["threads"] or "engine default"} · schema {escape(report["schema"])}</p>
{f'<ul class="note">{notes}</ul>' if notes else ""}
{body}
</body></html>
"""
