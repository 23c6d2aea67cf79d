"""The report's charts, drawn by matplotlib: inline SVG for the page, one PNG image for the file.

Two charts: live and expected grants per item (horizontal bars, the item and
its face value on the axis, each bar's count at its end) and the partitions as
a grid of cells coloured by state. The page embeds each as SVG; the PNG stacks
the same two charts under a band in the verdict's colour.

Figures are plain ``matplotlib.figure.Figure`` objects on an explicit Agg
canvas: no pyplot, no GUI backend, no global figure registry. matplotlib is
imported inside the functions, so importing the package stays cheap.

Text is DejaVu Sans (bundled with matplotlib, ₩ included) and the SVG carries
glyphs as paths, so the page needs no font and shows what the PNG shows. The
figure grows with the number of items and partitions instead of squeezing
them, so labels keep their size and never overlap (``text_collisions`` checks
that). The same result gives byte-identical SVG and PNG: no dates in the
metadata and a fixed salt for the SVG's ids.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from pipeline.report import model
from pipeline.report.style import (
    GRID,
    INK,
    MUTED_INK,
    PARTITION_STATE_COLOURS,
    SERIES,
    SERIES_COLOURS,
    WHITE,
    hex_colour,
    state_colour,
    state_label,
    verdict_colour,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure, SubFigure
    from matplotlib.typing import RcKeyType

DPI = 100
FIGURE_WIDTH_IN = 9.6
PNG_WIDTH_PX = round(FIGURE_WIDTH_IN * DPI)
BAND_HEIGHT_IN = 0.64  # the PNG's verdict band
PNG_BAND_HEIGHT_PX = round(BAND_HEIGHT_IN * DPI)
BAND_MARGIN_PX = 16

FONT_FAMILY = "DejaVu Sans"  # bundled with matplotlib: the same glyphs on every machine, U+20A9 (₩) included
FONT_SIZE_PT = 9
TITLE_SIZE_PT = 11
COUNT_LABEL_SIZE_PT = 8
COUNT_LABEL_PAD_PT = 3
PARTITION_TICK_SIZE_PT = 8

# Items: every item gets a fixed height, so 50 items make a taller chart, not thinner bars.
# Each bar (a share of the row) stays thicker than its count label, so labels of neighbours never touch.
ITEM_ROW_IN = 0.42
ITEM_BAR_SHARE = 0.38
ITEMS_FRAME_IN = 1.2  # legend above, value axis and its title below (and the title in the PNG)
ITEM_ROWS_MIN = 2  # room for the "no items" message
VALUE_AXIS_ROOM = 1.22  # the value axis reaches this far past the longest bar: room for its count label
VALUE_TICKS_MAX = 6

# Partitions: a grid of cells, at most 32 to a row (a row per 32 partitions: 1,024 make 32 rows).
PARTITION_COLUMNS_MAX = 32
PARTITION_ROW_IN = 0.27
PARTITION_CELL_SHARE = 0.86  # of a grid step; the rest is the white gap between cells
PARTITIONS_FRAME_IN = 1.2
PARTITION_ROWS_MIN = 2

RC_PARAMS: dict[RcKeyType, Any] = {
    "font.family": [FONT_FAMILY],
    "font.size": FONT_SIZE_PT,
    "text.color": hex_colour(INK),
    "axes.labelcolor": hex_colour(INK),
    "axes.edgecolor": hex_colour(MUTED_INK),
    "axes.spines.top": False,
    "axes.spines.right": False,
    "xtick.color": hex_colour(MUTED_INK),
    "ytick.color": hex_colour(MUTED_INK),
    "xtick.labelcolor": hex_colour(INK),
    "ytick.labelcolor": hex_colour(INK),
    "legend.frameon": False,
    "figure.facecolor": hex_colour(WHITE),
    "savefig.facecolor": hex_colour(WHITE),
    "svg.fonttype": "path",  # glyphs as paths: no font to load, the same shapes as in the PNG
    "svg.hashsalt": "entitle-report",  # ids from a fixed salt: the same figure gives the same SVG
}
SVG_METADATA: dict[str, Any] = {"Date": None, "Creator": None, "Format": None, "Type": None}
PNG_METADATA: dict[str, Any] = {"Software": None}


@contextmanager
def chart_style() -> Iterator[None]:
    """The report's matplotlib settings, for building, drawing and saving a figure (nothing global changes)."""
    import matplotlib

    with matplotlib.rc_context(RC_PARAMS), warnings.catch_warnings():
        # Characters DejaVu Sans lacks (Hangul in a campaign id, say) are drawn as boxes, not an error.
        warnings.filterwarnings("ignore", message=r"Glyph .* missing from")
        yield


# --------------------------------------------------------------------------- public rendering


def render_png(result: Mapping[str, Any]) -> bytes:
    """The verdict band and both charts as one PNG image, PNG_WIDTH_PX wide."""
    with chart_style():
        figure = report_figure(result)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=DPI, metadata=PNG_METADATA)
    return buffer.getvalue()


def render_svgs(result: Mapping[str, Any]) -> dict[str, str]:
    """Both charts as inline SVG for the page, by the id of their <svg> element."""
    with chart_style():
        return {
            "chart-items": figure_svg(items_figure(result), "chart-items", "live and expected grants per item"),
            "chart-partitions": figure_svg(partitions_figure(result), "chart-partitions", "partitions by state"),
        }


# --------------------------------------------------------------------------- figures


def items_figure(result: Mapping[str, Any]) -> Figure:
    """The per-item chart on its own (for the page)."""
    items = model.item_rows(result, model.campaign_terms(result))
    with chart_style():
        figure = _new_figure(items_height_in(len(items)))
        draw_items(figure.add_subplot(), items)
    return figure


def partitions_figure(result: Mapping[str, Any]) -> Figure:
    """The partition grid on its own (for the page)."""
    partitions = model.partition_rows(result)
    with chart_style():
        figure = _new_figure(partitions_height_in(len(partitions)))
        draw_partitions(figure.add_subplot(), partitions)
    return figure


def report_figure(result: Mapping[str, Any]) -> Figure:
    """The PNG's figure: the verdict band, then the per-item chart, then the partition grid.

    Each part is a subfigure with its own layout, so a long sku widens the item chart's margin only.
    """
    terms = model.campaign_terms(result)
    items = model.item_rows(result, terms)
    partitions = model.partition_rows(result)
    heights = [BAND_HEIGHT_IN, items_height_in(len(items)), partitions_height_in(len(partitions))]
    with chart_style():
        figure = _new_figure(sum(heights))
        parts = figure.subfigures(3, 1, squeeze=False, height_ratios=heights, hspace=0.0)
        band, upper, lower = (parts[row, 0] for row in range(3))
        draw_items(upper.add_subplot(), items, title="Live vs expected grants per item")
        draw_partitions(lower.add_subplot(), partitions, title=f"Partitions by state ({len(partitions):,})")
        _draw_band(band, result, terms)
    return figure


def items_height_in(item_count: int) -> float:
    return _whole_pixels(ITEMS_FRAME_IN + max(item_count, ITEM_ROWS_MIN) * ITEM_ROW_IN)


def partition_grid(partition_count: int) -> tuple[int, int]:
    """(columns, rows) of the partition grid."""
    columns = max(min(partition_count, PARTITION_COLUMNS_MAX), 1)
    return columns, max(math.ceil(partition_count / columns), 1)


def partitions_height_in(partition_count: int) -> float:
    _, rows = partition_grid(partition_count)
    return _whole_pixels(PARTITIONS_FRAME_IN + max(rows, PARTITION_ROWS_MIN) * PARTITION_ROW_IN)


def _whole_pixels(inches: float) -> float:
    """inches rounded to whole pixels, so each part of the PNG (the band above all) ends on a pixel edge."""
    return round(inches * DPI) / DPI


def _new_figure(height_in: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(FIGURE_WIDTH_IN, _whole_pixels(height_in)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)  # explicitly Agg: never a GUI backend
    return figure


def draw_items(axes: Axes, items: Sequence[model.ItemRow], title: str | None = None) -> None:
    """Expected and live grants per item as horizontal bars, each with its count; the first item on top."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    if title:
        axes.set_title(title, loc="left", fontsize=TITLE_SIZE_PT, fontweight="bold")
    if not items:
        _no_data(axes, "no items")
        return
    positions = list(range(len(items)))
    for offset, series in zip((-ITEM_BAR_SHARE / 2, ITEM_BAR_SHARE / 2), SERIES, strict=True):
        values = [item.expected if series == "expected" else item.live for item in items]
        bars = axes.barh(
            [p + offset for p in positions],
            [max(v, 0) for v in values],
            height=ITEM_BAR_SHARE,
            color=hex_colour(SERIES_COLOURS[series]),
            label=series,
        )
        for index, patch in enumerate(bars.patches):
            patch.set_gid(f"bar-{series}-{index}")
        labels = axes.bar_label(
            bars, labels=[f"{v:,}" for v in values], padding=COUNT_LABEL_PAD_PT, fontsize=COUNT_LABEL_SIZE_PT
        )
        for index, label in enumerate(labels):
            label.set_gid(f"count-{series}-{index}")
    axes.set_yticks(positions, [item.chart_label for item in items])
    axes.set_ylim(len(items) - 0.5, -0.5)
    longest = max(max(item.expected, item.live) for item in items)
    axes.set_xlim(0, max(longest, 1) * VALUE_AXIS_ROOM)
    axes.xaxis.set_major_locator(MaxNLocator(nbins=VALUE_TICKS_MAX, integer=True, min_n_ticks=2))
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _position: model.compact(value)))
    axes.set_xlabel("grants")
    axes.grid(axis="x", color=hex_colour(GRID), linewidth=0.8)
    axes.set_axisbelow(True)
    axes.tick_params(axis="y", length=0)
    axes.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=len(SERIES), borderaxespad=0.2)


def draw_partitions(axes: Axes, partitions: Sequence[model.PartitionRow], title: str | None = None) -> None:
    """One cell per partition, coloured by state, in partition id order: left to right, then the next row."""
    from matplotlib.collections import PolyCollection
    from matplotlib.patches import Patch

    if title:
        axes.set_title(title, loc="left", fontsize=TITLE_SIZE_PT, fontweight="bold")
    states = Counter(p.state for p in partitions)
    shown = [*PARTITION_STATE_COLOURS, *sorted(s for s in states if s not in PARTITION_STATE_COLOURS)]
    handles = [
        Patch(facecolor=hex_colour(state_colour(s)), edgecolor="none", label=f"{state_label(s)}: {states[s]:,}")
        for s in shown
    ]
    axes.legend(handles=handles, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=len(handles), borderaxespad=0.2)
    for spine in axes.spines.values():
        spine.set_visible(False)
    if not partitions:
        _no_data(axes, "no partitions")
        return
    columns, rows = partition_grid(len(partitions))
    half = PARTITION_CELL_SHARE / 2
    # One collection of squares, not an artist per partition: 1,024 cells draw in milliseconds.
    corners = []
    for index in range(len(partitions)):
        x, y = index % columns, index // columns
        corners.append([(x - half, y - half), (x + half, y - half), (x + half, y + half), (x - half, y + half)])
    cells = PolyCollection(
        corners, facecolors=[hex_colour(state_colour(p.state)) for p in partitions], edgecolors="none", linewidths=0
    )
    cells.set_gid("partition-cells")
    axes.add_collection(cells, autolim=False)
    axes.set_xlim(-0.5, columns - 0.5)
    axes.set_ylim(rows - 0.5, -0.5)
    axes.tick_params(length=0, labelsize=PARTITION_TICK_SIZE_PT)
    if rows == 1:
        axes.set_xticks(range(len(partitions)), [str(p.partition_id) for p in partitions])
        axes.set_yticks([])
        axes.set_xlabel("partition id")
    else:
        axes.set_xticks(range(columns), [f"+{c}" for c in range(columns)])
        axes.set_yticks(range(rows), [str(partitions[r * columns].partition_id) for r in range(rows)])
        axes.set_xlabel("partition id: the row's first id (left) + the column (below)")


def _no_data(axes: Axes, message: str) -> None:
    axes.text(0.5, 0.5, message, transform=axes.transAxes, ha="center", va="center", color=hex_colour(MUTED_INK))
    axes.set_xticks([])
    axes.set_yticks([])


def _draw_band(band: SubFigure, result: Mapping[str, Any], terms: model.CampaignTerms) -> None:
    """The verdict in white on its colour across the top; campaign, open breaks and finish time on the right."""
    verdict = str(result.get("verdict"))
    band.set_facecolor(hex_colour(verdict_colour(verdict)))
    white = hex_colour(WHITE)
    margin = BAND_MARGIN_PX / (FIGURE_WIDTH_IN * DPI)
    band.text(margin, 0.5, verdict, color=white, fontsize=24, fontweight="bold", va="center")
    open_breaks = result.get("open_breaks")
    details = [f"{open_breaks:,} open breaks"] if model.is_int(open_breaks) else []
    finished = model.local_time(result.get("finished_at"), terms.zone)
    if finished.iso is not None:
        details.append(f"finished {finished.shown}")
    campaign = model.text(result.get("campaign_id"))
    band.text(1.0 - margin, 0.7, campaign, color=white, fontsize=12, ha="right", va="center")
    band.text(1.0 - margin, 0.28, " \u00b7 ".join(details), color=white, fontsize=9.5, ha="right", va="center")


# --------------------------------------------------------------------------- SVG for the page

_SVG_ROOT = re.compile(r"<svg\b[^>]*>")
_SVG_VIEWBOX = re.compile(r'viewBox="([^"]+)"')
_SVG_METADATA = re.compile(r"<metadata>.*?</metadata>\s*", re.DOTALL)
_SVG_ID_REFERENCE = re.compile(r'(\bid="|\bxlink:href="#|\bhref="#|url\(#)([^")]+)')


def figure_svg(figure: Figure, svg_id: str, label: str) -> str:
    """The figure as an <svg> element to put inside HTML.

    Drops the XML prolog, DOCTYPE and metadata, names the root (``svg_id``, an aria label), and prefixes every
    id with ``svg_id`` so two charts on one page never share an id. References stay within the document
    (``href="#…"``, ``url(#…)``): nothing is fetched.
    """
    buffer = io.BytesIO()
    with chart_style():
        figure.savefig(buffer, format="svg", metadata=SVG_METADATA)
    document = buffer.getvalue().decode("utf-8")
    root = _SVG_ROOT.search(document)
    if root is None:
        raise ValueError("matplotlib wrote no <svg> element")
    view_box = _SVG_VIEWBOX.search(root.group(0))
    if view_box is None:
        raise ValueError("matplotlib wrote an <svg> element without a viewBox")
    body = _SVG_METADATA.sub("", document[root.end() :])
    body = _SVG_ID_REFERENCE.sub(lambda m: f"{m.group(1)}{svg_id}-{m.group(2)}", body)
    body = body.replace('xlink:href="#', 'href="#')
    return f'<svg id="{svg_id}" viewBox="{view_box.group(1)}" role="img" aria-label="{label}">{body.strip()}'


# --------------------------------------------------------------------------- layout check


def text_collisions(figure: Figure) -> list[str]:
    """What is wrong with the figure's text layout, once drawn: an empty list when nothing is.

    Every drawn text (tick labels inside the axis range, counts, titles, legends, the band) is compared
    with every other and with every bar and partition cell: overlapping boxes are reported, as is text
    that leaves the figure.
    """
    from matplotlib.text import Text

    with chart_style():
        figure.draw_without_rendering()  # lays the figure out as saving it would
        undrawn: set[int] = set()
        for axes in figure.axes:
            for axis in (axes.xaxis, axes.yaxis):
                low, high = sorted(axis.get_view_interval())
                for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:
                    if not low - 1e-9 <= tick.get_loc() <= high + 1e-9:
                        undrawn.update((id(tick.label1), id(tick.label2)))
        texts = [
            t
            for t in figure.findobj(Text, include_self=False)
            if isinstance(t, Text) and t.get_visible() and t.get_text().strip() and id(t) not in undrawn
        ]
        boxes = [(repr(t.get_text()), t.get_window_extent()) for t in texts]
        shapes = [
            (str(p.get_gid()), p.get_window_extent())
            for axes in figure.axes
            for p in axes.patches
            if str(p.get_gid()).startswith(("bar-", "partition-"))
        ]
    problems = []
    page = figure.bbox
    for index, (name, box) in enumerate(boxes):
        if box.x0 < page.x0 - 1 or box.y0 < page.y0 - 1 or box.x1 > page.x1 + 1 or box.y1 > page.y1 + 1:
            problems.append(f"{name} leaves the figure")
        for other_name, other in boxes[index + 1 :]:
            if _overlap(box, other):
                problems.append(f"{name} overlaps {other_name}")
        for shape_name, shape in shapes:
            if _overlap(box, shape):
                problems.append(f"{name} overlaps {shape_name}")
    return problems


def _overlap(a: Any, b: Any, tolerance_px: float = 0.5) -> bool:
    """Whether two display boxes overlap by more than tolerance_px each way (touching is fine)."""
    return bool(
        a.x0 + tolerance_px < b.x1
        and b.x0 + tolerance_px < a.x1
        and a.y0 + tolerance_px < b.y1
        and b.y0 + tolerance_px < a.y1
    )
