"""Render a reconciliation result as a self-contained HTML page and a PNG chart.

The HTML page works offline: inline CSS, charts as inline SVG, no scripts, no
fonts, no images, and a Content-Security-Policy that forbids loading anything.
The PNG is drawn pixel by pixel in pure Python (a tiny 5x7 bitmap font for the
text) and encoded with zlib and struct, so neither needs a plotting library.

Both are deterministic: the same result gives byte-identical output, because
nothing depends on the clock, on randomness or on dict order we did not choose.
Every string taken from the result is HTML-escaped: skus and break details are
user data and may contain markup.
"""

from __future__ import annotations

import html
import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HTML_FILENAME = "report.html"
PNG_FILENAME = "report.png"

TOP_BREAKS_SHOWN_MAX = 100
SKU_LABEL_CHARS_MAX = 24  # longer skus are cut in chart labels; the tooltip keeps the full sku
ITEM_VALUE_LABELS_MAX = 16  # above this many items the numbers over the bars would overlap
AXIS_TICKS_TARGET = 5
PARTITION_LABELS_MAX = 9
BAR_WIDTH_SHARE = 0.36  # of an item's group, per series; the rest is space between groups
PARTITION_GAP_MIN_SLOT_PX = 4.0  # bars narrower than this touch; a gap would eat the whole bar

RGB = tuple[int, int, int]

VERDICT_COLOURS: dict[str, RGB] = {
    "RECONCILED": (0x1A, 0x7F, 0x37),  # green
    "BREAKS": (0xCF, 0x22, 0x2E),  # red
    "INCOMPLETE": (0xBF, 0x87, 0x00),  # amber
}
UNKNOWN_VERDICT_COLOUR: RGB = (0x57, 0x60, 0x6A)  # grey: a verdict we do not know must not look like one we do

# Lighter shades than the verdict colours, so a bar is never mistaken for the verdict badge.
PARTITION_STATE_COLOURS: dict[str, RGB] = {
    "matched": (0x4A, 0xC2, 0x6B),  # green
    "breaks": (0xFA, 0x45, 0x49),  # red
    "not_granted": (0x8C, 0x95, 0x9F),  # grey
    "unreadable": (0xE3, 0xA0, 0x08),  # amber
}
UNKNOWN_STATE_COLOUR: RGB = (0x24, 0x29, 0x2F)  # near-black: stands out, never hidden among the known states
PARTITION_STATE_LABELS = {
    "matched": "matched",
    "breaks": "breaks",
    "not_granted": "not granted",
    "unreadable": "unreadable",
}
# When several partitions share one PNG pixel column, the column shows the worst of them, so a break is never hidden.
PARTITION_STATE_SEVERITY = {"matched": 0, "not_granted": 1, "unreadable": 2, "breaks": 3}
UNKNOWN_STATE_SEVERITY = 4

SERIES_COLOURS: dict[str, RGB] = {
    "expected": (0x54, 0xAE, 0xFF),  # light blue
    "live": (0x05, 0x50, 0xAE),  # dark blue
}
BREAK_CLASSES = ("missing", "unexpected", "terms_mismatch", "duplicate")

INK: RGB = (0x1F, 0x23, 0x28)
MUTED_INK: RGB = (0x57, 0x60, 0x6A)
GRID: RGB = (0xD0, 0xD7, 0xDE)
WHITE: RGB = (0xFF, 0xFF, 0xFF)

# SVG geometry, in SVG user units (the SVG scales to the page width).
ITEM_CHART_WIDTH = 900
ITEM_PLOT_LEFT = 80
ITEM_PLOT_RIGHT = 880
ITEM_PLOT_TOP = 24
ITEM_PLOT_BOTTOM = 250
ITEM_LABELS_ROOM = 52  # below the plot: sku labels and the axis title
ITEM_ROTATED_LABELS_ROOM = 140  # slanted skus of up to SKU_LABEL_CHARS_MAX characters need more
ITEM_GROUP_MIN_WIDTH = 110  # narrower groups get slanted sku labels so neighbours do not overlap
PARTITION_CHART_WIDTH = 900
PARTITION_CHART_HEIGHT = 200
PARTITION_PLOT_LEFT = 40
PARTITION_PLOT_RIGHT = 880
PARTITION_PLOT_TOP = 16
PARTITION_PLOT_BOTTOM = 146

# PNG geometry, in pixels.
PNG_WIDTH_PX = 960
PNG_HEIGHT_PX = 540
PNG_BAND_HEIGHT_PX = 64
PNG_MARGIN_PX = 16
PNG_ITEM_TITLE_Y_PX = 76
PNG_ITEM_PLOT_LEFT_PX = 84
PNG_ITEM_PLOT_RIGHT_PX = 944
PNG_ITEM_PLOT_TOP_PX = 104
PNG_ITEM_PLOT_BOTTOM_PX = 296
PNG_PARTITION_TITLE_Y_PX = 336
PNG_PARTITION_PLOT_LEFT_PX = 84
PNG_PARTITION_PLOT_RIGHT_PX = 944
PNG_PARTITION_PLOT_TOP_PX = 362
PNG_PARTITION_PLOT_BOTTOM_PX = 500
PNG_SWATCH_PX = 14
PNG_VERDICT_SCALE = 4  # the 5x7 font at four times its size: 20x28 px letters
PNG_ZLIB_LEVEL = 6

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_BIT_DEPTH = 8
PNG_COLOUR_TYPE_RGB = 2

# A 5x7 bitmap font: seven rows per glyph, five bits per row, most significant bit on the left.
GLYPH_WIDTH_PX = 5
GLYPH_HEIGHT_PX = 7
GLYPH_ADVANCE_PX = GLYPH_WIDTH_PX + 1
FONT_5X7: dict[str, tuple[int, ...]] = {
    "A": (0x0E, 0x11, 0x11, 0x11, 0x1F, 0x11, 0x11),
    "B": (0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E),
    "C": (0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E),
    "D": (0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C),
    "E": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F),
    "F": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10),
    "G": (0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F),
    "H": (0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11),
    "I": (0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E),
    "J": (0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C),
    "K": (0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11),
    "L": (0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F),
    "M": (0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11),
    "N": (0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11),
    "O": (0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E),
    "P": (0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10),
    "Q": (0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D),
    "R": (0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11),
    "S": (0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E),
    "T": (0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04),
    "U": (0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E),
    "V": (0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04),
    "W": (0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A),
    "X": (0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11),
    "Y": (0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04),
    "Z": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F),
    "0": (0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E),
    "1": (0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E),
    "2": (0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F),
    "3": (0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E),
    "4": (0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02),
    "5": (0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E),
    "6": (0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E),
    "7": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08),
    "8": (0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E),
    "9": (0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C),
    " ": (0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00),
    "-": (0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00),
    ".": (0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C),
    ",": (0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08),
    ":": (0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00),
    "%": (0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03),
    "/": (0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00),
    "(": (0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02),
    ")": (0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08),
    "_": (0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F),
    "+": (0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00),
    "=": (0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00),
    "#": (0x0A, 0x0A, 0x1F, 0x0A, 0x1F, 0x0A, 0x0A),
    "?": (0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04),
}
MISSING_GLYPH = "?"

CSS = """
:root { color-scheme: light; }
body { margin: 0; background: #fff; color: #1f2328; line-height: 1.45;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "Noto Sans", sans-serif; }
main { max-width: 1100px; margin: 0 auto; padding: 20px 24px 48px; }
h1 { font-size: 1.6rem; margin: 0 0 4px; }
h2 { font-size: 1.2rem; margin: 28px 0 8px; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; }
.meta { display: grid; grid-template-columns: max-content 1fr; gap: 0 16px; margin: 0; color: #57606a;
  font-size: 0.9rem; }
.meta dt { font-weight: 600; }
.meta dd { margin: 0; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.verdict-row { display: flex; align-items: center; gap: 20px; margin: 20px 0 8px; flex-wrap: wrap; }
#verdict { display: inline-block; padding: 14px 32px; border-radius: 8px; color: #fff; font-size: 2.4rem;
  font-weight: 700; letter-spacing: 0.06em; }
.explanation { font-size: 1.1rem; margin: 0; max-width: 60ch; }
table { border-collapse: collapse; font-size: 0.95rem; }
th, td { padding: 4px 12px; border-bottom: 1px solid #d0d7de; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
caption { text-align: left; font-weight: 600; padding: 4px 0; }
.bridge { display: flex; gap: 40px; flex-wrap: wrap; }
.bridge > div { flex: 1 1 360px; }
.bridge tr.total td { font-weight: 700; border-bottom: 2px solid #1f2328; }
.bridge tr.residual.nonzero td { background: #ffebe9; color: #82071e; font-weight: 700; }
.identity { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.85rem;
  color: #57606a; margin: 6px 0 0; }
.warning { color: #82071e; font-weight: 600; }
svg { display: block; width: 100%; height: auto; }
svg text { fill: #1f2328; }
.legend { display: flex; gap: 18px; flex-wrap: wrap; font-size: 0.9rem; margin: 6px 0; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; margin-right: 6px;
  vertical-align: -1px; }
.note { color: #57606a; font-size: 0.9rem; }
.breaks td.detail { max-width: 40ch; overflow-wrap: anywhere; }
.breaks td.id { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.85rem; }
"""

# Nothing may be fetched: no scripts, no fonts, no images, no frames; only the inline stylesheet.
CONTENT_SECURITY_POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src 'none'; base-uri 'none'"


# --------------------------------------------------------------------------- public API


def render_html(result: Mapping[str, Any]) -> str:
    """Render the reconciliation result as one self-contained HTML page."""
    verdict = str(result["verdict"])
    campaign_id = _text(result.get("campaign_id"))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Reconciliation {_esc(verdict)}: {_esc(campaign_id)}</title>",
        f"<style>{CSS}{_verdict_css(verdict)}</style>",
        "</head>",
        "<body>",
        "<main>",
        _html_header(result),
        _html_verdict(result),
        _html_bridge(result["bridge"]),
        _html_items(result["items"]),
        _html_partitions(result["partitions"]),
        _html_breaks_by_class(result.get("breaks_by_class")),
        _html_top_breaks(result),
        "</main>",
        "</body>",
        "</html>",
    ]
    return "\n".join(parts) + "\n"


def render_png(result: Mapping[str, Any]) -> bytes:
    """Render the verdict band, the per-item chart and the per-partition chart as one PNG image."""
    canvas = _Canvas(PNG_WIDTH_PX, PNG_HEIGHT_PX, WHITE)
    _png_band(canvas, result)
    _png_items(canvas, result["items"])
    _png_partitions(canvas, result["partitions"])
    return _encode_png(canvas)


def write_report(result: Mapping[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write report.html and report.png into out_dir (atomically: temp file + os.replace), return their paths."""
    # Render both before writing either, so a rendering error leaves the previous report untouched.
    html_bytes = render_html(result).encode("utf-8")
    png_bytes = render_png(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path = out_dir / HTML_FILENAME
    png_path = out_dir / PNG_FILENAME
    _write_atomic(html_path, html_bytes)
    _write_atomic(png_path, png_bytes)
    return html_path, png_path


def _write_atomic(path: Path, data: bytes) -> None:
    # A reader (a browser, a CI artefact upload) sees the old file or the new one, never half of one.
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- values


def _text(value: object) -> str:
    """A display string for any JSON value; missing values show as a dash."""
    if value is None:
        return "\u2014"
    return str(value)


def _esc(value: object) -> str:
    return html.escape(_text(value), quote=True)


def _count(value: object) -> int:
    """An integer count from a JSON value; anything that is not an int counts as zero."""
    if isinstance(value, bool) or not isinstance(value, int):
        return 0
    return value


def _thousands(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return _text(value)


def _compact(value: int) -> str:
    """A short axis label: 950, 9,500, 95K, 9.5M."""
    if abs(value) < 10_000:
        return f"{value:,}"
    if abs(value) < 1_000_000:
        return _trim_decimal(value / 1_000) + "K"
    if abs(value) < 1_000_000_000:
        return _trim_decimal(value / 1_000_000) + "M"
    return _trim_decimal(value / 1_000_000_000) + "G"


def _trim_decimal(value: float) -> str:
    text = f"{value:.1f}"
    return text[:-2] if text.endswith(".0") else text


def _coord(value: float) -> str:
    # Two decimals are plenty on screen and keep the output independent of float repr details.
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _hex(colour: RGB) -> str:
    return "#{:02x}{:02x}{:02x}".format(*colour)


def _nice_ticks(maximum: int) -> list[int]:
    """Axis ticks 0, step, 2*step, ... covering maximum, with step 1, 2 or 5 times a power of ten."""
    maximum = max(maximum, 1)
    rough = max(maximum // AXIS_TICKS_TARGET, 1)
    magnitude = 1
    while magnitude * 10 <= rough:
        magnitude *= 10
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= rough)
    top = -(-maximum // step) * step
    return list(range(0, top + 1, step))


def _partition_ticks(count: int) -> list[int]:
    """Indices of the partitions whose ids label the x axis: every step-th one and the last."""
    if count <= PARTITION_LABELS_MAX:
        return list(range(count))
    # A power-of-two step, because partition counts are powers of two (128, 1024): labels 0, 16, 32, ...
    step = 1
    while step * (PARTITION_LABELS_MAX - 1) < count - 1:
        step *= 2
    ticks = list(range(0, count - 1, step))
    if count - 1 - ticks[-1] < step / 2:
        ticks.pop()  # too close to the last label, the two would overlap
    return [*ticks, count - 1]


def _sorted_partitions(partitions: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return sorted(partitions, key=lambda p: _count(p["partition_id"]))


def _label(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


# --------------------------------------------------------------------------- HTML sections


def _verdict_css(verdict: str) -> str:
    colour = VERDICT_COLOURS.get(verdict, UNKNOWN_VERDICT_COLOUR)
    return f"#verdict {{ background: {_hex(colour)}; }}\n"


def _html_header(result: Mapping[str, Any]) -> str:
    fields = [
        ("reconciliation", result.get("reconciliation_id")),
        ("snapshot", result.get("snapshot_id")),
        ("started", result.get("started_at")),
        ("finished", result.get("finished_at")),
    ]
    rows = "".join(f"<dt>{name}</dt><dd>{_esc(value)}</dd>" for name, value in fields)
    return (
        f"<header><h1>Reconciliation report: {_esc(result.get('campaign_id'))}</h1>"
        f'<dl class="meta">{rows}</dl></header>'
    )


def _html_verdict(result: Mapping[str, Any]) -> str:
    verdict = str(result["verdict"])
    return (
        '<section class="verdict-row" aria-label="verdict">'
        f'<div id="verdict" class="verdict-{_esc(verdict.lower())}">{_esc(verdict)}</div>'
        f'<p class="explanation">{_esc(result.get("explanation"))}</p>'
        "</section>"
    )


def _html_bridge(bridge: Mapping[str, Any]) -> str:
    expected_side = _html_bridge_side(
        "Expected side",
        ("expected", "expected grants"),
        [("matched", "matched"), ("terms_mismatch", "terms mismatch"), ("missing", "missing"), ("voided", "voided")],
        ("residual_expected", "residual (unexplained)"),
        bridge,
    )
    ledger_side = _html_bridge_side(
        "Ledger side",
        ("ledger", "ledger grants"),
        [
            ("matched", "matched"),
            ("terms_mismatch", "terms mismatch"),
            ("unexpected", "unexpected"),
            ("duplicate", "duplicate"),
        ],
        ("residual_ledger", "residual (unexplained)"),
        bridge,
    )
    return f'<section><h2>Bridge</h2><div class="bridge">{expected_side}{ledger_side}</div></section>'


def _html_bridge_side(
    caption: str,
    total: tuple[str, str],
    terms: list[tuple[str, str]],
    residual: tuple[str, str],
    bridge: Mapping[str, Any],
) -> str:
    total_key, total_label = total
    residual_key, residual_label = residual
    total_value = bridge[total_key]
    residual_value = bridge[residual_key]
    rows = [f'<tr class="total"><td>{total_label}</td><td class="num">{_thousands(total_value)}</td></tr>']
    for position, (key, label) in enumerate(terms):
        sign = "=" if position == 0 else "+"
        rows.append(f'<tr><td>{sign} {label}</td><td class="num">{_thousands(bridge[key])}</td></tr>')
    nonzero = " nonzero" if residual_value != 0 else ""
    rows.append(
        f'<tr class="residual{nonzero}"><td>+ {residual_label}</td>'
        f'<td class="num">{_thousands(residual_value)}</td></tr>'
    )
    identity = f"{total_key} = " + " + ".join([key for key, _ in terms] + [residual_key])
    # The residual is defined as what the terms leave over; if the numbers disagree the bridge itself is wrong.
    values = [bridge[key] for key, _ in terms] + [total_value, residual_value]
    warning = ""
    if all(isinstance(v, int) for v in values):
        left_over = _count(total_value) - sum(_count(bridge[key]) for key, _ in terms)
        if left_over != residual_value:
            warning = (
                f'<p class="warning">identity does not hold: {total_key} minus the terms leaves '
                f"{left_over:,}, the residual says {_thousands(residual_value)}</p>"
            )
    return (
        f"<div><table><caption>{caption}</caption><tbody>{''.join(rows)}</tbody></table>"
        f'<p class="identity">{identity}</p>{warning}</div>'
    )


def _html_items(items: Sequence[Mapping[str, Any]]) -> str:
    legend = "".join(
        f'<span><span class="swatch" style="background:{_hex(SERIES_COLOURS[s])}"></span>{s}</span>'
        for s in ("expected", "live")
    )
    return (
        "<section><h2>Live grants vs expected, per item</h2>"
        f'<div class="legend">{legend}</div>{_svg_items(items)}</section>'
    )


def _svg_items(items: Sequence[Mapping[str, Any]]) -> str:
    plot_width = ITEM_PLOT_RIGHT - ITEM_PLOT_LEFT
    plot_height = ITEM_PLOT_BOTTOM - ITEM_PLOT_TOP
    values = [(_text(item["item_sku"]), int(item["expected"]), int(item["live"])) for item in items]
    ticks = _nice_ticks(max((max(e, v) for _, e, v in values), default=0))
    top = ticks[-1]
    group_width = plot_width / max(len(values), 1)
    bar_width = group_width * BAR_WIDTH_SHARE
    rotate_labels = group_width < ITEM_GROUP_MIN_WIDTH
    chart_height = ITEM_PLOT_BOTTOM + (ITEM_ROTATED_LABELS_ROOM if rotate_labels else ITEM_LABELS_ROOM)
    parts = [
        f'<svg id="chart-items" viewBox="0 0 {ITEM_CHART_WIDTH} {chart_height}" role="img" '
        'aria-label="live grants vs expected per item" font-size="12">',
    ]
    for tick in ticks:
        y = ITEM_PLOT_BOTTOM - plot_height * tick / top
        parts.append(
            f'<line x1="{ITEM_PLOT_LEFT}" x2="{ITEM_PLOT_RIGHT}" y1="{_coord(y)}" y2="{_coord(y)}" '
            f'stroke="{_hex(GRID)}" stroke-width="1"/>'
            f'<text x="{ITEM_PLOT_LEFT - 8}" y="{_coord(y + 4)}" text-anchor="end">{_compact(tick)}</text>'
        )
    if not values:
        parts.append(
            f'<text x="{ITEM_PLOT_LEFT + plot_width / 2}" y="{ITEM_PLOT_TOP + plot_height / 2}" '
            'text-anchor="middle">no items</text>'
        )
    for index, (sku, expected, live) in enumerate(values):
        group_left = ITEM_PLOT_LEFT + index * group_width
        centre = group_left + group_width / 2
        for offset, series, value in ((-bar_width, "expected", expected), (0.0, "live", live)):
            height = plot_height * max(value, 0) / top
            x = centre + offset
            y = ITEM_PLOT_BOTTOM - height
            parts.append(
                f'<rect class="bar" data-series="{series}" x="{_coord(x)}" y="{_coord(y)}" '
                f'width="{_coord(bar_width)}" height="{_coord(height)}" fill="{_hex(SERIES_COLOURS[series])}">'
                f"<title>{_esc(sku)}: {series} {value:,}</title></rect>"
            )
            if len(values) <= ITEM_VALUE_LABELS_MAX:
                parts.append(
                    f'<text x="{_coord(x + bar_width / 2)}" y="{_coord(y - 4)}" text-anchor="middle" '
                    f'font-size="11">{value:,}</text>'
                )
        label = _esc(_label(sku, SKU_LABEL_CHARS_MAX))
        if rotate_labels:
            parts.append(
                f'<text x="{_coord(centre)}" y="{ITEM_PLOT_BOTTOM + 14}" text-anchor="end" '
                f'transform="rotate(-35 {_coord(centre)} {ITEM_PLOT_BOTTOM + 14})">{label}</text>'
            )
        else:
            parts.append(f'<text x="{_coord(centre)}" y="{ITEM_PLOT_BOTTOM + 18}" text-anchor="middle">{label}</text>')
    parts.append(
        f'<line x1="{ITEM_PLOT_LEFT}" x2="{ITEM_PLOT_RIGHT}" y1="{ITEM_PLOT_BOTTOM}" y2="{ITEM_PLOT_BOTTOM}" '
        f'stroke="{_hex(INK)}" stroke-width="1"/>'
        f'<line x1="{ITEM_PLOT_LEFT}" x2="{ITEM_PLOT_LEFT}" y1="{ITEM_PLOT_TOP}" y2="{ITEM_PLOT_BOTTOM}" '
        f'stroke="{_hex(INK)}" stroke-width="1"/>'
        f'<text x="16" y="{(ITEM_PLOT_TOP + ITEM_PLOT_BOTTOM) // 2}" text-anchor="middle" '
        f'transform="rotate(-90 16 {(ITEM_PLOT_TOP + ITEM_PLOT_BOTTOM) // 2})">grants</text>'
        f'<text x="{(ITEM_PLOT_LEFT + ITEM_PLOT_RIGHT) // 2}" y="{chart_height - 6}" '
        'text-anchor="middle">item</text>'
        "</svg>"
    )
    return "".join(parts)


def _html_partitions(partitions: Sequence[Mapping[str, Any]]) -> str:
    counts = {state: 0 for state in PARTITION_STATE_COLOURS}
    for partition in partitions:
        state = str(partition["state"])
        counts[state] = counts.get(state, 0) + 1
    legend = "".join(
        f'<span><span class="swatch" style="background:{_hex(_state_colour(state))}">'
        f"</span>{_esc(PARTITION_STATE_LABELS.get(state, state))}: {count:,}</span>"
        for state, count in counts.items()
    )
    return (
        f"<section><h2>Partitions ({len(partitions):,})</h2>"
        f'<div class="legend">{legend}</div>{_svg_partitions(partitions)}</section>'
    )


def _svg_partitions(partitions: Sequence[Mapping[str, Any]]) -> str:
    ordered = _sorted_partitions(partitions)
    plot_width = PARTITION_PLOT_RIGHT - PARTITION_PLOT_LEFT
    plot_height = PARTITION_PLOT_BOTTOM - PARTITION_PLOT_TOP
    slot = plot_width / max(len(ordered), 1)
    gap = 1.0 if slot >= PARTITION_GAP_MIN_SLOT_PX else 0.0
    parts = [
        f'<svg id="chart-partitions" viewBox="0 0 {PARTITION_CHART_WIDTH} {PARTITION_CHART_HEIGHT}" role="img" '
        'aria-label="partitions coloured by state" font-size="12">'
    ]
    if not ordered:
        parts.append(
            f'<text x="{PARTITION_PLOT_LEFT + plot_width / 2}" y="{PARTITION_PLOT_TOP + plot_height / 2}" '
            'text-anchor="middle">no partitions</text>'
        )
    for index, partition in enumerate(ordered):
        state = str(partition["state"])
        colour = _state_colour(state)
        tooltip = (
            f"partition {_esc(partition['partition_id'])}: {_esc(PARTITION_STATE_LABELS.get(state, state))}, "
            f"expected {_esc(_thousands(partition.get('expected')))}, live {_esc(_thousands(partition.get('live')))}, "
            f"breaks {_esc(_thousands(partition.get('breaks')))}"
        )
        parts.append(
            f'<rect class="bar" data-state="{_esc(state)}" x="{_coord(PARTITION_PLOT_LEFT + index * slot)}" '
            f'y="{PARTITION_PLOT_TOP}" width="{_coord(slot - gap)}" height="{plot_height}" fill="{_hex(colour)}">'
            f"<title>{tooltip}</title></rect>"
        )
    for index in _partition_ticks(len(ordered)):
        x = PARTITION_PLOT_LEFT + (index + 0.5) * slot
        parts.append(
            f'<line x1="{_coord(x)}" x2="{_coord(x)}" y1="{PARTITION_PLOT_BOTTOM}" y2="{PARTITION_PLOT_BOTTOM + 5}" '
            f'stroke="{_hex(INK)}" stroke-width="1"/>'
            f'<text x="{_coord(x)}" y="{PARTITION_PLOT_BOTTOM + 19}" text-anchor="middle">'
            f"{_esc(ordered[index]['partition_id'])}</text>"
        )
    parts.append(
        f'<line x1="{PARTITION_PLOT_LEFT}" x2="{PARTITION_PLOT_RIGHT}" y1="{PARTITION_PLOT_BOTTOM}" '
        f'y2="{PARTITION_PLOT_BOTTOM}" stroke="{_hex(INK)}" stroke-width="1"/>'
        f'<text x="{(PARTITION_PLOT_LEFT + PARTITION_PLOT_RIGHT) // 2}" y="{PARTITION_CHART_HEIGHT - 6}" '
        'text-anchor="middle">partition id</text>'
        "</svg>"
    )
    return "".join(parts)


def _html_breaks_by_class(breaks_by_class: object) -> str:
    if not isinstance(breaks_by_class, Mapping) or not breaks_by_class:
        return '<section><h2>Breaks by class</h2><p class="note">no break counts reported</p></section>'
    # The known classes first in a fixed order, then anything new in the order it came.
    keys = [k for k in BREAK_CLASSES if k in breaks_by_class] + [k for k in breaks_by_class if k not in BREAK_CLASSES]
    rows = "".join(
        f"<tr><td>{_esc(str(key).replace('_', ' '))}</td>"
        f'<td class="num">{_esc(_thousands(breaks_by_class[key]))}</td></tr>'
        for key in keys
    )
    total = sum(_count(breaks_by_class[key]) for key in keys)
    return (
        '<section><h2>Breaks by class</h2><table><thead><tr><th>class</th><th class="num">breaks</th></tr></thead>'
        f'<tbody>{rows}</tbody><tfoot><tr><th>total</th><th class="num">{total:,}</th></tr></tfoot></table></section>'
    )


def _html_top_breaks(result: Mapping[str, Any]) -> str:
    raw = result.get("top_breaks")
    entries = [b for b in raw if isinstance(b, Mapping)] if isinstance(raw, list) else []
    shown = entries[:TOP_BREAKS_SHOWN_MAX]
    open_breaks = result.get("open_breaks")
    total = open_breaks if isinstance(open_breaks, int) and not isinstance(open_breaks, bool) else len(entries)
    note = f'<p class="note">showing {len(shown):,} of {total:,} open breaks</p>'
    if not shown:
        return f"<section><h2>Top breaks</h2>{note}</section>"
    columns = (
        ("break_id", "break id", "id"),
        ("break_class", "class", ""),
        ("user_id", "user", "num"),
        ("item_sku", "item", ""),
        ("partition_id", "partition", "num"),
        ("detail", "detail", "detail"),
    )
    head = "".join(f'<th class="{css}">{title}</th>' if css else f"<th>{title}</th>" for _, title, css in columns)
    rows = []
    for entry in shown:
        cells = "".join(
            f'<td class="{css}">{_esc(entry.get(key))}</td>' if css else f"<td>{_esc(entry.get(key))}</td>"
            for key, _, css in columns
        )
        rows.append(f"<tr>{cells}</tr>")
    return (
        f'<section><h2>Top breaks</h2>{note}<table class="breaks"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )


# --------------------------------------------------------------------------- PNG drawing


class _Canvas:
    """An RGB pixel buffer, row-major, three bytes per pixel."""

    def __init__(self, width_px: int, height_px: int, background: RGB) -> None:
        self.width_px = width_px
        self.height_px = height_px
        self.pixels = bytearray(bytes(background) * (width_px * height_px))

    def fill_rect(self, left_px: int, top_px: int, right_px: int, bottom_px: int, colour: RGB) -> None:
        """Fill [left, right) x [top, bottom), clipped to the canvas."""
        left_px, right_px = max(left_px, 0), min(right_px, self.width_px)
        top_px, bottom_px = max(top_px, 0), min(bottom_px, self.height_px)
        if left_px >= right_px or top_px >= bottom_px:
            return
        run = bytes(colour) * (right_px - left_px)
        stride = self.width_px * 3
        for y in range(top_px, bottom_px):
            start = y * stride + left_px * 3
            self.pixels[start : start + len(run)] = run

    def copy_row_span(self, left_px: int, top_px: int, bottom_px: int, span: bytes) -> None:
        """Paint the same row of pixels (span, RGB bytes) on every row from top to bottom."""
        stride = self.width_px * 3
        for y in range(max(top_px, 0), min(bottom_px, self.height_px)):
            start = y * stride + left_px * 3
            self.pixels[start : start + len(span)] = span

    def text(self, left_px: int, top_px: int, text: str, colour: RGB, scale: int) -> int:
        """Draw text in the 5x7 font (uppercased; unknown characters as '?'); return the right edge."""
        x = left_px
        for char in text.upper():
            glyph = FONT_5X7.get(char, FONT_5X7[MISSING_GLYPH])
            for row, bits in enumerate(glyph):
                for column in range(GLYPH_WIDTH_PX):
                    if bits & (1 << (GLYPH_WIDTH_PX - 1 - column)):
                        px = x + column * scale
                        py = top_px + row * scale
                        self.fill_rect(px, py, px + scale, py + scale, colour)
            x += GLYPH_ADVANCE_PX * scale
        return x


def _text_width_px(text: str, scale: int) -> int:
    # The advance includes one blank column after the last glyph; it is not part of the visible width.
    return max(len(text) * GLYPH_ADVANCE_PX - 1, 0) * scale


def _fit(text: str, width_px: int, scale: int) -> str:
    """Cut text (ending in '..') so it fits width_px at this scale."""
    if _text_width_px(text, scale) <= width_px:
        return text
    chars = max(width_px // (GLYPH_ADVANCE_PX * scale) - 2, 0)
    return text[:chars] + ".." if chars else ""


def _png_band(canvas: _Canvas, result: Mapping[str, Any]) -> None:
    verdict = str(result["verdict"])
    canvas.fill_rect(0, 0, canvas.width_px, PNG_BAND_HEIGHT_PX, VERDICT_COLOURS.get(verdict, UNKNOWN_VERDICT_COLOUR))
    top_px = (PNG_BAND_HEIGHT_PX - GLYPH_HEIGHT_PX * PNG_VERDICT_SCALE) // 2
    right = canvas.text(PNG_MARGIN_PX, top_px, verdict, WHITE, PNG_VERDICT_SCALE)
    detail_left = right + 2 * PNG_MARGIN_PX
    detail_width = canvas.width_px - PNG_MARGIN_PX - detail_left
    campaign = _text(result.get("campaign_id"))
    open_breaks = result.get("open_breaks")
    breaks_line = f"{_count(open_breaks):,} OPEN BREAKS" if isinstance(open_breaks, int) else ""
    canvas.text(detail_left, 14, _fit(campaign, detail_width, 2), WHITE, 2)
    canvas.text(detail_left, 36, _fit(breaks_line, detail_width, 2), WHITE, 2)


def _png_legend(canvas: _Canvas, top_px: int, entries: list[tuple[str, RGB]]) -> None:
    """Right-aligned legend: a swatch and a label per entry."""
    widths = [PNG_SWATCH_PX + 6 + _text_width_px(label, 2) for label, _ in entries]
    x = canvas.width_px - PNG_MARGIN_PX - sum(widths) - PNG_MARGIN_PX * (len(entries) - 1)
    for (label, colour), width in zip(entries, widths, strict=True):
        canvas.fill_rect(x, top_px, x + PNG_SWATCH_PX, top_px + PNG_SWATCH_PX, colour)
        canvas.text(x + PNG_SWATCH_PX + 6, top_px, label, INK, 2)
        x += width + PNG_MARGIN_PX


def _png_items(canvas: _Canvas, items: Sequence[Mapping[str, Any]]) -> None:
    canvas.text(PNG_MARGIN_PX, PNG_ITEM_TITLE_Y_PX, "LIVE VS EXPECTED GRANTS PER ITEM", INK, 2)
    _png_legend(
        canvas, PNG_ITEM_TITLE_Y_PX, [("EXPECTED", SERIES_COLOURS["expected"]), ("LIVE", SERIES_COLOURS["live"])]
    )
    left, right = PNG_ITEM_PLOT_LEFT_PX, PNG_ITEM_PLOT_RIGHT_PX
    top, bottom = PNG_ITEM_PLOT_TOP_PX, PNG_ITEM_PLOT_BOTTOM_PX
    values = [(_text(item["item_sku"]).upper(), int(item["expected"]), int(item["live"])) for item in items]
    ticks = _nice_ticks(max((max(e, v) for _, e, v in values), default=0))
    for tick in ticks:
        y = bottom - (bottom - top) * tick // ticks[-1]
        canvas.fill_rect(left, y, right, y + 1, GRID)
        label = _compact(tick)
        canvas.text(left - 8 - _text_width_px(label, 2), y - GLYPH_HEIGHT_PX, label, INK, 2)
    group_px = (right - left) / max(len(values), 1)
    bar_px = max(int(group_px * BAR_WIDTH_SHARE), 1)
    for index, (sku, expected, live) in enumerate(values):
        centre = left + int(index * group_px + group_px / 2)
        for bar_left, series, value in ((centre - bar_px, "expected", expected), (centre, "live", live)):
            height = (bottom - top) * max(value, 0) // ticks[-1]
            canvas.fill_rect(bar_left, bottom - height, bar_left + bar_px, bottom, SERIES_COLOURS[series])
        # Twice the size when it fits the group, else the plain font, else cut.
        room = int(group_px) - 4
        scale = 2 if _text_width_px(sku, 2) <= room else 1
        label = _fit(sku, room, scale)
        canvas.text(centre - _text_width_px(label, scale) // 2, bottom + 6, label, INK, scale)
    canvas.fill_rect(left, bottom, right, bottom + 1, INK)
    canvas.fill_rect(left, top, left + 1, bottom, INK)


def _png_partitions(canvas: _Canvas, partitions: Sequence[Mapping[str, Any]]) -> None:
    ordered = _sorted_partitions(partitions)
    canvas.text(PNG_MARGIN_PX, PNG_PARTITION_TITLE_Y_PX, f"PARTITIONS BY STATE ({len(ordered):,})", INK, 2)
    _png_legend(
        canvas,
        PNG_PARTITION_TITLE_Y_PX,
        [(PARTITION_STATE_LABELS[s].upper(), colour) for s, colour in PARTITION_STATE_COLOURS.items()],
    )
    left, right = PNG_PARTITION_PLOT_LEFT_PX, PNG_PARTITION_PLOT_RIGHT_PX
    top, bottom = PNG_PARTITION_PLOT_TOP_PX, PNG_PARTITION_PLOT_BOTTOM_PX
    canvas.fill_rect(left, bottom, right, bottom + 1, INK)
    if not ordered:
        message = "NO PARTITIONS"
        canvas.text((left + right - _text_width_px(message, 2)) // 2, (top + bottom) // 2, message, MUTED_INK, 2)
        return
    # Draw one row of the strip, then copy it down: one slice per row instead of one per pixel.
    width_px = right - left
    count = len(ordered)
    states = [str(p["state"]) for p in ordered]
    span = bytearray(bytes(WHITE) * width_px)
    if count <= width_px:
        for index, state in enumerate(states):
            bar_left, bar_right = index * width_px // count, (index + 1) * width_px // count
            if bar_right - bar_left >= PARTITION_GAP_MIN_SLOT_PX:
                bar_right -= 1  # a white column between wide neighbours
            span[bar_left * 3 : bar_right * 3] = bytes(_state_colour(state)) * (bar_right - bar_left)
    else:
        # More partitions than pixel columns: each column shows the worst partition it covers.
        for column in range(width_px):
            first, end = column * count // width_px, (column + 1) * count // width_px
            worst = max(states[first:end], key=_state_severity)
            span[column * 3 : column * 3 + 3] = bytes(_state_colour(worst))
    canvas.copy_row_span(left, top, bottom, bytes(span))
    for index in _partition_ticks(count):
        x = left + (2 * index + 1) * width_px // (2 * count)
        canvas.fill_rect(x, bottom, x + 1, bottom + 5, INK)
        label = _text(ordered[index]["partition_id"])
        label_left = min(x - _text_width_px(label, 2) // 2, canvas.width_px - 2 - _text_width_px(label, 2))
        canvas.text(label_left, bottom + 9, label, INK, 2)


def _state_colour(state: str) -> RGB:
    return PARTITION_STATE_COLOURS.get(state, UNKNOWN_STATE_COLOUR)


def _state_severity(state: str) -> int:
    return PARTITION_STATE_SEVERITY.get(state, UNKNOWN_STATE_SEVERITY)


def _encode_png(canvas: _Canvas) -> bytes:
    stride = canvas.width_px * 3
    pixels = bytes(canvas.pixels)
    # Filter type 0 (None) on every row: simplest to decode, and zlib still compresses the flat colours well.
    raw = b"".join(b"\x00" + pixels[y * stride : (y + 1) * stride] for y in range(canvas.height_px))
    header = struct.pack(">IIBBBBB", canvas.width_px, canvas.height_px, PNG_BIT_DEPTH, PNG_COLOUR_TYPE_RGB, 0, 0, 0)
    return b"".join(
        [
            PNG_SIGNATURE,
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", zlib.compress(raw, PNG_ZLIB_LEVEL)),
            _png_chunk(b"IEND", b""),
        ]
    )


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
