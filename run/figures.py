"""The report's figures, written by hand: SVG charts as text, pictures inline as data URIs.

eval.py --report writes one HTML file that opens from disk with no network and no JavaScript, so every
figure lives inside it: a chart is an <svg> element (bars, lines, axes and labels, each a few attributes),
a picture a base64 PNG or JPEG in an <img>'s src. A bar or a line holds a <title>: the browser shows its
value on hover, with no script.

  bar_chart    groups of bars in [0, 1], one bar per series, with a dashed mark at chance in each group
  line_chart   lines over a shared x axis (loss terms over steps), each with its colour and dash pattern
  data_uri     a PIL image -> "data:image/png;base64,..." (or JPEG), the smaller of the two when asked
"""

import base64
import io
import math
from html import escape

from PIL import Image

# a colour per series (a checkpoint), in --ckpt order; the loss terms keep run/pictures.py's colours
SERIES = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
DASHES = ["", "7 4", "2 3", "10 3 2 3", "4 2 1 2"]  # a dash pattern per run in a line chart
FONT = 'font-family="sans-serif" font-size="11"'


def rgb(colour: tuple[int, int, int]) -> str:
    return "#%02x%02x%02x" % colour


def data_uri(image: Image.Image, fmt: str = "png", quality: int = 85) -> str:
    """An image inline: fmt "png", "jpeg", or "smaller" (both encoded, the shorter kept: PNG for flat
    drawings, JPEG for photographs)."""
    encoded = {}
    for kind in ("png", "jpeg") if fmt == "smaller" else (fmt,):
        out = io.BytesIO()
        image.convert("RGB").save(out, format=kind.upper(), **({"quality": quality} if kind == "jpeg" else {}))
        encoded[kind] = out.getvalue()
    kind = min(encoded, key=lambda k: len(encoded[k]))
    return f"data:image/{kind};base64,{base64.b64encode(encoded[kind]).decode()}"


def svg(width: float, height: float, parts: list[str], label: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="{escape(label)}">' + "".join(parts) + "</svg>"
    )


def text(x: float, y: float, s: str, anchor: str = "start", extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" {FONT} {extra}>{escape(s)}</text>'


def legend(entries: list[tuple[str, str]], x: float, y: float) -> list[str]:
    """Coloured squares with their names, in a row from (x, y)."""
    parts = []
    for name, colour in entries:
        parts += [f'<rect x="{x:.1f}" y="{y - 9:.1f}" width="10" height="10" fill="{colour}"/>', text(x + 14, y, name)]
        x += 24 + 6.2 * len(name)
    return parts


def bar_chart(groups: list[str], series: list[str], values: list[list[float]], chance: list[float | None]) -> str:
    """values[g][s]: the accuracy of series s in group g (NaN: no bar); chance[g]: where chance lies (None:
    not marked). Bars from 0 to 1, a group per metric, its name below at a slant."""
    bar, gap, left, top, plot, below = 12, 14, 40, 30, 200, 110
    group_width = bar * len(series) + gap
    width = max(left + group_width * len(groups) + 20, 420)
    parts = legend([(s, SERIES[k % len(SERIES)]) for k, s in enumerate(series)], left, 14)
    parts += [
        f'<line x1="{width - 84}" y1="10" x2="{width - 66}" y2="10" stroke="#000" stroke-dasharray="3 2"/>',
        text(width - 60, 14, "chance"),
    ]
    for k in range(5):  # the y axis: 0, 0.25, ..., 1 with a light grid line each
        y = top + plot * (1 - k / 4)
        parts += [
            f'<line x1="{left}" y1="{y:.1f}" x2="{width - 10}" y2="{y:.1f}" stroke="#ddd"/>',
            text(left - 4, y + 4, f"{k / 4:g}", "end"),
        ]
    for g, name in enumerate(groups):
        x0 = left + gap / 2 + g * group_width
        for s, value in enumerate(values[g]):
            if not math.isfinite(value):
                continue
            h = plot * min(max(value, 0.0), 1.0)
            parts.append(
                f'<rect x="{x0 + s * bar:.1f}" y="{top + plot - h:.1f}" width="{bar - 2}" height="{h:.1f}" '
                f'fill="{SERIES[s % len(SERIES)]}" class="bar"><title>{escape(series[s])}: {value:.3f}</title></rect>'
            )
        if chance[g] is not None:
            y = top + plot * (1 - chance[g])
            parts.append(
                f'<line x1="{x0 - 3:.1f}" y1="{y:.1f}" x2="{x0 + bar * len(series) + 1:.1f}" y2="{y:.1f}" '
                f'stroke="#000" stroke-width="1.5" stroke-dasharray="3 2" class="chance">'
                f"<title>chance {chance[g]:.3g}</title></line>"
            )
        cx, cy = x0 + bar * len(series) / 2, top + plot + 10
        parts.append(text(cx, cy, name, "end", f'transform="rotate(-40 {cx:.1f} {cy:.1f})"'))
    parts.append(f'<line x1="{left}" y1="{top + plot}" x2="{width - 10}" y2="{top + plot}" stroke="#000"/>')
    return svg(width, top + plot + below, parts, "accuracy per metric, a bar per checkpoint")


def ticks(lo: float, hi: float, n: int) -> list[float]:
    return [lo + (hi - lo) * k / (n - 1) for k in range(n)]


def line_chart(lines: list[dict], x_label: str, y_label: str, width: int = 760, height: int = 320) -> str:
    """lines: {"name", "colour", "dash", "points": [(x, y), ...]}: one polyline each (non-finite points left
    out), on axes that hold them all, with their names in a legend below."""
    lines = [dict(line, points=[p for p in line["points"] if all(map(math.isfinite, p))]) for line in lines]
    lines = [line for line in lines if line["points"]]
    xs = [x for line in lines for x, _ in line["points"]] or [0.0, 1.0]
    ys = [y for line in lines for _, y in line["points"]] or [0.0, 1.0]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1e-6)  # one point, or a flat line, still has axes
    left, right, top, plot_h = 56, 16, 20, height - 60
    rows = math.ceil(len(lines) / 3)
    full = height + 18 * rows

    def px(x, y):
        return left + (x - x0) / (x1 - x0) * (width - left - right), top + (1 - (y - y0) / (y1 - y0)) * plot_h

    parts = [f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{plot_h}" fill="none" stroke="#000"/>']
    for v in ticks(y0, y1, 5):
        parts.append(text(left - 4, px(x0, v)[1] + 4, f"{v:.3g}", "end"))
    for v in ticks(x0, x1, 3):
        parts.append(text(px(v, y0)[0], top + plot_h + 14, f"{v:.0f}", "middle"))
    parts += [text(width / 2, top + plot_h + 30, x_label, "middle"), text(left, 12, y_label)]
    for k, line in enumerate(lines):
        drawn = line["points"] * (1 + (len(line["points"]) == 1))  # a lone point: a dot (round caps)
        points = " ".join(f"{a:.1f},{b:.1f}" for a, b in (px(*p) for p in drawn))
        dash = f' stroke-dasharray="{line["dash"]}"' if line["dash"] else ""
        parts.append(
            f'<polyline points="{points}" fill="none" stroke="{line["colour"]}" stroke-width="2" '
            f'stroke-linecap="round"{dash} class="curve">'
            f"<title>{escape(line['name'])}</title></polyline>"
        )
        lx, ly = left + (k % 3) * (width - left) / 3, height + 18 * (k // 3)
        sample = f'<line x1="{lx:.1f}" y1="{ly - 4}" x2="{lx + 26:.1f}" y2="{ly - 4}" stroke="{line["colour"]}"'
        parts += [f'{sample} stroke-width="2"{dash}/>', text(lx + 32, ly, line["name"])]
    return svg(width, full, parts, f"{y_label} against {x_label}")


def fit(image: Image.Image, side: int) -> Image.Image:
    """The image scaled so its longer side is `side`: up in whole pixels (a 64-pixel scene stays sharp), down
    smoothly (a photograph)."""
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.NEAREST if scale >= 1 else Image.LANCZOS)
