"""pipeline.report: the HTML page and the PNG chart of a reconciliation, checked as bytes, as figures and in Chromium.

The PNG checks decode the image with a small decoder written here (zlib and the
five standard row filters), so they test the pixels, not the encoder's intent.
Layout is checked on the matplotlib figures themselves: every drawn text's box
against every other and against the bars. The browser tests open the written
page in headless Chromium and check both the DOM it built and the pixels of a
screenshot.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from collections import Counter
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from pipeline import report
from pipeline.report import charts

CHROMIUM_TIMEOUT_S = 60
SCREENSHOT_WIDTH_PX = 1200
SCREENSHOT_HEIGHT_PX = 2000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STATES = ("matched", "breaks", "not_granted", "unreadable")
SKUS = ("emoticon-permanent", "emoticon-30d", "emoticon-90d", "coupon-2000", "coupon-3000")
SCRIPT_SKU = '<script>alert("sku")</script>'
SCRIPT_DETAIL = "<script>alert('detail')</script> expected amount 2000, not in ledger"
# Attributes that make a browser fetch something; on this page they may only point inside it (#id).
FETCHING_ATTRIBUTES = {"src", "href", "xlink:href", "srcset", "action", "formaction", "poster", "data", "background"}
WON = "\u20a9"


# --------------------------------------------------------------------------- inputs


def make_result(
    verdict: str = "BREAKS",
    skus: tuple[str, ...] = SKUS,
    states: list[str] | None = None,
    top_breaks: int = 9,
    open_breaks: int = 9,
    expected: int = 50,
) -> dict[str, Any]:
    """A result shaped like ``Reconciliation.as_dict()``; 128 partitions cycling through the states.

    Like the real result it carries no time zone and no face values: the report takes them from the
    bundled campaign of the same id (kakao-outage-2022: Asia/Seoul, coupons of ₩2,000 and ₩3,000).
    """
    if states is None:
        states = [STATES[p % len(STATES)] if p % 5 == 0 else "matched" for p in range(128)]
    items = [
        {
            "item_sku": sku,
            "item_key": index + 1,
            "expected": expected,
            "live": expected - index,
            "matched": expected - index,
            "terms_mismatch": 0,
            "missing": index,
            "voided": 0,
            "unexpected": 0,
            "duplicate": 0,
        }
        for index, sku in enumerate(skus)
    ]
    partitions = [
        {
            "partition_id": pid,
            "state": state,
            "expected": 1200,
            "live": 1199 if state == "breaks" else 1200,
            "breaks": 1,
        }
        for pid, state in enumerate(states)
    ]
    breaks = [
        {
            "break_id": f"b-{index:012x}",
            "break_class": "missing",
            "user_id": 1_234_567 + index,
            "item_sku": "coupon-2000",
            "partition_id": 17,
            "detail": "expected amount 2000, not in ledger",
        }
        for index in range(top_breaks)
    ]
    return {
        "reconciliation_id": "rec-20261128T180000Z-1a2b3c4d",
        "campaign_id": "kakao-outage-2022",
        "snapshot_id": "3f9a0c1d2e4b5a6c",
        "started_at": "2026-11-28T18:00:00+00:00",
        "finished_at": "2026-11-28T18:01:10+00:00",
        "verdict": verdict,
        "explanation": "3 missing grants and 4 unexpected grants are not explained by voids",
        "bridge": {
            "expected": 250,
            "matched": 240,
            "terms_mismatch": 2,
            "missing": 3,
            "voided": 5,
            "ledger": 246,
            "unexpected": 4,
            "duplicate": 0,
            "residual_expected": 0,
            "residual_ledger": 0,
        },
        "items": items,
        "partitions": partitions,
        "breaks_by_class": {"missing": 3, "unexpected": 4, "terms_mismatch": 2, "duplicate": 0},
        "open_breaks": open_breaks,
        "top_breaks": breaks,
    }


def hostile_result() -> dict[str, Any]:
    """A result whose user data carries markup in every place user data can reach the page."""
    result = make_result(skus=(SCRIPT_SKU, *SKUS[1:]))
    result["top_breaks"][0]["detail"] = SCRIPT_DETAIL
    result["top_breaks"][1]["item_sku"] = SCRIPT_SKU
    result["campaign_id"] = '<script>alert("campaign")</script>camp"aign<&>'
    result["explanation"] = "<img src=x onerror=alert(1)> broke"
    result["partitions"][5]["error"] = "<b>unreadable</b> partition file"
    return result


def fifty_item_result() -> dict[str, Any]:
    """Fifty items with long skus (the longest a campaign allows: 63) and eight-digit counts, 1,024 partitions."""
    skus = tuple("emoticon-90d-" + "x" * 47 + f"-{index:02d}" for index in range(50))  # they differ at the end
    return make_result(skus=skus, states=[STATES[p % 4] for p in range(1024)], expected=12_345_678)


# --------------------------------------------------------------------------- HTML parsing


class PageParser(HTMLParser):
    """Collects what the tests look at: the verdict, chart groups and their comments, scripts, attributes, ids."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.verdict_text = ""
        self.verdict_elements = 0
        self.scripts = 0
        self.attributes: list[tuple[str, str]] = []
        self.ids: list[str] = []
        self.text: list[str] = []
        self.svg_ids: list[str] = []
        self.group_comments: dict[str, list[str]] = {}  # chart group id: the comments (matplotlib's text) in it
        self.group_fills: dict[str, list[str]] = {}  # chart group id: fills of the paths directly in it
        self.meta_csp: str | None = None
        self._verdict_depth = 0
        self._groups: list[str] = []
        self._in_svg = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        self.attributes.extend(values.items())
        if "id" in values:
            self.ids.append(values["id"])
        if tag == "script":
            self.scripts += 1
        if tag == "meta" and values.get("http-equiv", "").lower() == "content-security-policy":
            self.meta_csp = values.get("content")
        if self._verdict_depth:
            self._verdict_depth += 1
        elif values.get("id") == "verdict":
            self.verdict_elements += 1
            self._verdict_depth = 1
        if tag == "svg":
            self._in_svg = True
            self.svg_ids.append(values.get("id", ""))
        if tag == "g" and self._in_svg:
            self._groups.append(values.get("id", ""))
        if tag == "path" and self._groups:
            fill = re.search(r"fill:\s*(#[0-9a-f]{6})", values.get("style", ""))
            if fill:
                self.group_fills.setdefault(self._groups[-1], []).append(fill.group(1))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag == "g" and self._in_svg:
            self._groups.pop()

    def handle_endtag(self, tag: str) -> None:
        if self._verdict_depth:
            self._verdict_depth -= 1
        if tag == "svg":
            self._in_svg = False
        if tag == "g" and self._groups:
            self._groups.pop()

    def handle_comment(self, data: str) -> None:
        if self._groups:
            self.group_comments.setdefault(self._groups[-1], []).append(data.strip())

    def handle_data(self, data: str) -> None:
        if not self._in_svg:
            self.text.append(data)
        if self._verdict_depth:
            self.verdict_text += data

    def groups(self, prefix: str) -> list[str]:
        """Ids of the chart groups starting with prefix, in document order."""
        return [i for i in self.ids if i.startswith(prefix)]


def parse_page(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    parser.close()
    return parser


def svg_section(page: str, svg_id: str) -> str:
    match = re.search(rf'<svg[^>]*\bid="{svg_id}".*?</svg>', page, re.DOTALL)
    assert match, f"no <svg id={svg_id}>"
    return match.group(0)


def comments_in(svg: str) -> list[str]:
    """What matplotlib wrote as comments: the text of every label, in drawing order."""
    return [c.strip() for c in re.findall(r"<!--(.*?)-->", svg, re.DOTALL)]


def unescape(text: str) -> str:
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&amp;", "&")


# --------------------------------------------------------------------------- PNG decoding


@dataclass(frozen=True)
class Image:
    width_px: int
    height_px: int
    channels: int
    pixels: bytes  # unfiltered rows, `channels` bytes per pixel
    filter_types: frozenset[int]

    def rgb_counts(self) -> Counter[tuple[int, int, int]]:
        c = self.channels
        return Counter(zip(self.pixels[0::c], self.pixels[1::c], self.pixels[2::c], strict=True))

    def rgb_counts_in_rows(self, top_px: int, bottom_px: int) -> Counter[tuple[int, int, int]]:
        stride = self.width_px * self.channels
        rows = self.pixels[top_px * stride : bottom_px * stride]
        c = self.channels
        return Counter(zip(rows[0::c], rows[1::c], rows[2::c], strict=True))


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """Split a PNG into (type, body) chunks, checking the signature and every CRC."""
    assert data[:8] == PNG_SIGNATURE, data[:8]
    chunks = []
    position = 8
    while position < len(data):
        length, tag = struct.unpack(">I4s", data[position : position + 8])
        body = data[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length : position + 12 + length])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF, f"bad CRC in {tag!r}"
        chunks.append((tag, body))
        position += 12 + length
    assert position == len(data), "trailing bytes after the last chunk"
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    return chunks


def _paeth(left: int, up: int, up_left: int) -> int:
    estimate = left + up - up_left
    distance_left, distance_up, distance_up_left = abs(estimate - left), abs(estimate - up), abs(estimate - up_left)
    if distance_left <= distance_up and distance_left <= distance_up_left:
        return left
    return up if distance_up <= distance_up_left else up_left


def unfilter_row(filter_type: int, row: bytearray, previous: bytes, bpp: int) -> None:
    """Undo one PNG row filter in place (None, Sub, Up, Average, Paeth; PNG spec section 9)."""
    n = len(row)
    if filter_type == 0:
        return
    if filter_type == 1:
        for i in range(bpp, n):
            row[i] = (row[i] + row[i - bpp]) & 0xFF
    elif filter_type == 2:
        row[:] = bytes((a + b) & 0xFF for a, b in zip(row, previous, strict=True))
    elif filter_type == 3:
        for i in range(n):
            left = row[i - bpp] if i >= bpp else 0
            row[i] = (row[i] + ((left + previous[i]) >> 1)) & 0xFF
    elif filter_type == 4:
        for i in range(bpp):
            row[i] = (row[i] + previous[i]) & 0xFF  # Paeth with no left neighbour is Up
        for i in range(bpp, n):
            row[i] = (row[i] + _paeth(row[i - bpp], previous[i], previous[i - bpp])) & 0xFF
    else:
        raise AssertionError(f"unknown PNG filter type {filter_type}")


def decode_png(data: bytes) -> Image:
    """Decode an 8-bit, non-interlaced RGB or RGBA PNG."""
    chunks = png_chunks(data)
    width, height, depth, colour_type, compression, filter_method, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, compression, filter_method, interlace) == (8, 0, 0, 0)
    assert colour_type in (2, 6), f"colour type {colour_type} not supported by this decoder"
    channels = 3 if colour_type == 2 else 4
    raw = zlib.decompress(b"".join(body for tag, body in chunks if tag == b"IDAT"))
    stride = width * channels
    assert len(raw) == height * (stride + 1)
    pixels = bytearray(height * stride)
    previous = bytes(stride)
    filter_types = set()
    for y in range(height):
        start = y * (stride + 1)
        filter_types.add(raw[start])
        row = bytearray(raw[start + 1 : start + 1 + stride])
        unfilter_row(raw[start], row, previous, channels)
        pixels[y * stride : (y + 1) * stride] = row
        previous = bytes(row)
    return Image(width, height, channels, bytes(pixels), frozenset(filter_types))


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def test_decoder_undoes_every_filter_type() -> None:
    # Filter by hand with each type, then check the decoder restores the original pixels.
    width, height, bpp = 5, 5, 3
    original = [bytes((x * 37 + y * 11 + c * 5) % 256 for x in range(width) for c in range(bpp)) for y in range(height)]
    filtered = b""
    previous = bytes(width * bpp)
    for filter_type, row in enumerate(original):
        out = bytearray()
        for i, value in enumerate(row):
            left = row[i - bpp] if i >= bpp else 0
            up_left = previous[i - bpp] if i >= bpp else 0
            predictor = [0, left, previous[i], (left + previous[i]) >> 1, _paeth(left, previous[i], up_left)]
            out.append((value - predictor[filter_type]) & 0xFF)
        filtered += bytes([filter_type]) + bytes(out)
        previous = row
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    png = PNG_SIGNATURE + png_chunk(b"IHDR", header)
    png += png_chunk(b"IDAT", zlib.compress(filtered)) + png_chunk(b"IEND", b"")
    image = decode_png(png)
    assert image.pixels == b"".join(original)
    assert image.filter_types == {0, 1, 2, 3, 4}


# --------------------------------------------------------------------------- colours and fonts


def is_green(rgb: tuple[int, int, int]) -> bool:
    r, g, b = rgb
    return g > r + 40 and g > b + 40


def is_red(rgb: tuple[int, int, int]) -> bool:
    r, g, b = rgb
    return r > g + 100 and r > b + 100


def is_amber(rgb: tuple[int, int, int]) -> bool:
    r, g, b = rgb
    return r > 150 and r > g > b + 60


def is_grey(rgb: tuple[int, int, int]) -> bool:
    return max(rgb) - min(rgb) < 32 and 64 < max(rgb) < 224


def hex_of(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def test_colours_mean_what_the_legend_says() -> None:
    assert is_green(report.VERDICT_COLOURS["RECONCILED"])
    assert is_red(report.VERDICT_COLOURS["BREAKS"])
    assert is_amber(report.VERDICT_COLOURS["INCOMPLETE"])
    assert is_green(report.PARTITION_STATE_COLOURS["matched"])
    assert is_red(report.PARTITION_STATE_COLOURS["breaks"])
    assert is_grey(report.PARTITION_STATE_COLOURS["not_granted"])
    assert is_amber(report.PARTITION_STATE_COLOURS["unreadable"])
    # Pixel checks tell bars from the badge and one state from another only if no two colours are equal.
    colours = [
        *report.VERDICT_COLOURS.values(),
        *report.PARTITION_STATE_COLOURS.values(),
        *report.SERIES_COLOURS.values(),
    ]
    assert len(set(colours)) == len(colours)


def test_chart_font_is_matplotlibs_dejavu_sans_and_has_the_won_sign() -> None:
    import matplotlib
    from matplotlib import font_manager, ft2font

    with charts.chart_style():
        path = font_manager.findfont(font_manager.FontProperties(family=charts.FONT_FAMILY), fallback_to_default=False)
    assert Path(path).name == "DejaVuSans.ttf"
    assert Path(path).is_relative_to(Path(matplotlib.get_data_path())), f"{path}: not the font matplotlib ships"
    assert ft2font.FT2Font(path).get_char_index(ord(WON)) != 0, "DejaVu Sans has no glyph for U+20A9"


def test_importing_the_package_loads_neither_matplotlib_nor_jinja2_and_rendering_uses_agg_without_pyplot() -> None:
    code = (
        "import sys; import pipeline.report as r; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'matplotlib', 'jinja2'})); "
        "import matplotlib; before = matplotlib.rcParams.copy(); "  # copy(): does not resolve the backend
        f"r.render_png({make_result()!r}); r.render_html({make_result()!r}); "
        "print('matplotlib.pyplot' in sys.modules, matplotlib.rcParams.copy() == before)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["[]", "False True"]  # and the global rcParams are left alone


# --------------------------------------------------------------------------- HTML


@pytest.mark.parametrize("verdict", ["RECONCILED", "BREAKS", "INCOMPLETE"])
def test_html_shows_verdict_in_badge_with_its_colour_and_explanation(verdict: str) -> None:
    page = report.render_html(make_result(verdict=verdict))
    parsed = parse_page(page)
    assert parsed.verdict_elements == 1
    assert parsed.verdict_text.strip() == verdict
    assert "3 missing grants and 4 unexpected grants are not explained by voids" in "".join(parsed.text)
    colour = hex_of(report.VERDICT_COLOURS[verdict])
    assert re.search(rf"#verdict\s*\{{\s*background:\s*{colour}", page), f"badge is not {colour}"
    assert "<title>Reconciliation " in page and "kakao-outage-2022</title>" in page


def test_html_escapes_every_string_from_the_result() -> None:
    page = report.render_html(hostile_result())
    parsed = parse_page(page)
    assert "<script" not in page.lower()
    assert "<img" not in page.lower() and "<b>" not in page
    assert parsed.scripts == 0
    assert "onerror" not in {name for name, _ in parsed.attributes}
    text = "".join(parsed.text)
    # The markup survives as text the reader can see: in the items table and the breaks table, the heading, ...
    assert text.count(SCRIPT_SKU) >= 2
    assert SCRIPT_DETAIL in text
    assert "<img src=x onerror=alert(1)> broke" in text
    assert 'Reconciliation report: <script>alert("campaign")</script>camp"aign<&>' in text
    assert "<b>unreadable</b> partition file" in text
    assert "&lt;script&gt;alert(&#34;sku&#34;)&lt;/script&gt;" in page  # Jinja2's escaping
    assert "<title>Reconciliation BREAKS: &lt;script&gt;alert(&#34;campaign&#34;)" in page
    # The charts draw the sku as glyphs; matplotlib's comment naming it is escaped too.
    assert SCRIPT_SKU in [unescape(c) for c in comments_in(svg_section(page, "chart-items"))]


def test_html_template_has_autoescaping_on() -> None:
    from pipeline.report import page

    environment = page._environment()
    assert environment.autoescape is True or environment.autoescape(page.TEMPLATE)  # type: ignore[operator]
    assert "&lt;script&gt;" in environment.from_string("{{ value }}").render(value="<script>")


def test_html_is_self_contained() -> None:
    page = report.render_html(hostile_result())
    parsed = parse_page(page)
    ids = parsed.ids
    assert len(ids) == len(set(ids)), [i for i, n in Counter(ids).items() if n > 1][:5]
    # Only references inside the page: the SVG's glyphs (<use href="#…">) and clip paths (url(#…)).
    for name, value in parsed.attributes:
        if name in FETCHING_ATTRIBUTES:
            assert value.startswith("#") and value[1:] in ids, (name, value)
    for target in re.findall(r"url\(([^)]*)\)", page):
        assert target.startswith("#") and target[1:] in ids, target
    assert "http://" not in page and "https://" not in page
    for construct in (
        "@import",
        "<link",
        "<iframe",
        "<object",
        "<embed",
        "<script",
        "<image",
        "<img",
        "<foreignobject",
    ):
        assert construct not in page.lower(), construct
    assert parsed.meta_csp == report.CONTENT_SECURITY_POLICY
    assert "default-src 'none'" in report.CONTENT_SECURITY_POLICY  # the browser would refuse to fetch anything anyway
    assert parsed.svg_ids == ["chart-items", "chart-partitions"]


def test_html_item_chart_has_a_bar_and_a_count_label_per_item_and_series() -> None:
    result = make_result(expected=1_234_567)
    page = report.render_html(result)
    parsed = parse_page(page)
    assert parsed.groups("chart-items-bar-") == [
        f"chart-items-bar-{series}-{index}" for series in ("expected", "live") for index in range(len(SKUS))
    ]
    for index, item in enumerate(result["items"]):
        for series in ("expected", "live"):
            label = parsed.group_comments[f"chart-items-count-{series}-{index}"]
            assert label == [f"{item[series]:,}"], (series, index, label)  # 1,234,567 and 1,234,566 ...
    fills = {series: parsed.group_fills[f"chart-items-bar-{series}-0"] for series in ("expected", "live")}
    assert fills == {series: [hex_of(colour)] for series, colour in report.SERIES_COLOURS.items()}
    texts = comments_in(svg_section(page, "chart-items"))
    assert "grants" in texts and "expected" in texts and "live" in texts  # value axis title and legend


def test_item_bar_lengths_are_in_proportion() -> None:
    result = make_result()
    result["items"][0]["live"] = 25  # half of expected
    figure = charts.items_figure(result)
    bars = {patch.get_gid(): patch for patch in figure.axes[0].patches}
    expected, live = bars["bar-expected-0"], bars["bar-live-0"]
    assert live.get_width() == pytest.approx(expected.get_width() / 2)
    assert expected.get_width() == 50
    assert live.get_y() > expected.get_y()  # live under expected (the axis runs top-down)
    assert bars["bar-expected-1"].get_y() > live.get_y()  # and the next item under both


def test_face_values_are_shown_in_won() -> None:
    page = report.render_html(make_result())
    rows = re.findall(r'<tr><td class="sku">([^<]*)</td><td class="num">([^<]*)</td>', page)
    assert rows == [
        ("emoticon-permanent", "\u2014"),
        ("emoticon-30d", "\u2014"),
        ("emoticon-90d", "\u2014"),
        ("coupon-2000", f"{WON}2,000"),
        ("coupon-3000", f"{WON}3,000"),
    ]
    labels = comments_in(svg_section(page, "chart-items"))
    assert f"coupon-2000 ({WON}2,000)" in labels and f"coupon-3000 ({WON}3,000)" in labels
    assert "emoticon-30d" in labels
    # A result that carries face values wins over the bundled campaign.
    result = make_result()
    result["items"][3]["amount_krw"] = 1_500_000
    result["items"][4]["amount_krw"] = None
    page = report.render_html(result)
    assert f">{WON}1,500,000</td>" in page and f"{WON}3,000" not in page
    assert f"coupon-2000 ({WON}1,500,000)" in comments_in(svg_section(page, "chart-items"))


def test_times_are_shown_in_the_campaign_time_zone() -> None:
    page = report.render_html(make_result())  # kakao-outage-2022: Asia/Seoul, UTC+9
    assert '<time datetime="2026-11-28T18:00:00+00:00">2026-11-29 03:00:00 KST (UTC+09:00)</time>' in page
    assert '<time datetime="2026-11-28T18:01:10+00:00">2026-11-29 03:01:10 KST (UTC+09:00)</time>' in page
    assert "<dt>time zone</dt><dd>Asia/Seoul</dd>" in page
    band = [t.get_text() for t in charts.report_figure(make_result()).subfigs[0].texts]
    assert "9 open breaks \u00b7 finished 2026-11-29 03:01:10 KST (UTC+09:00)" in band
    # A result that names its zone wins; a campaign the report does not know is shown in UTC.
    result = make_result()
    result["time_zone"] = "America/New_York"
    assert ">2026-11-28 13:00:00 EST (UTC-05:00)</time>" in report.render_html(result)
    result = make_result()
    result["campaign_id"] = "some-other-campaign"
    page = report.render_html(result)
    assert ">2026-11-28 18:00:00 UTC</time>" in page and "<dd>UTC</dd>" in page


@pytest.mark.parametrize("partition_count", [1, 128, 1024])
def test_html_has_one_cell_per_partition_coloured_by_state_in_id_order(partition_count: int) -> None:
    states = [STATES[(p * 7) % len(STATES)] for p in range(partition_count)]
    result = make_result(states=states)
    result["partitions"].reverse()  # the chart orders by partition id, whatever order they came in
    parsed = parse_page(report.render_html(result))
    fills = parsed.group_fills["chart-partitions-partition-cells"]
    assert fills == [hex_of(report.PARTITION_STATE_COLOURS[state]) for state in states]
    legend = comments_in(svg_section(report.render_html(result), "chart-partitions"))
    for state in STATES:
        label = report.PARTITION_STATE_LABELS[state]
        assert f"{label}: {states.count(state):,}" in legend


def test_partition_cells_follow_the_grid_left_to_right_then_down() -> None:
    figure = charts.partitions_figure(make_result(states=["matched"] * 100))
    (cells,) = figure.axes[0].collections
    centres = [path.vertices[:4].mean(axis=0) for path in cells.get_paths()]
    assert len(centres) == 100
    assert [tuple(c) for c in centres[:2]] == [(0.0, 0.0), (1.0, 0.0)]
    assert tuple(centres[32]) == (0.0, 1.0) and tuple(centres[99]) == (3.0, 3.0)
    labels = [t.get_text() for t in figure.axes[0].get_yticklabels()]
    assert labels == ["0", "32", "64", "96"]


def test_html_lists_the_partitions_that_are_not_matched() -> None:
    page = report.render_html(make_result())
    assert "showing 19 of 19 partitions that are not matched" in page
    table = re.search(r'<table class="partitions">.*?</table>', page, re.DOTALL)
    assert table
    ids = re.findall(r'<tr><td class="num">(\d+)</td>', table.group(0))
    assert ids == [str(p) for p in range(0, 128, 5) if STATES[p % 4] != "matched"]
    many = report.render_html(make_result(states=["breaks"] * 1024))
    assert "showing 100 of 1,024 partitions that are not matched" in many
    assert "partitions that are not matched" not in report.render_html(make_result(states=["matched"] * 8))


def test_html_bridge_shows_identities_and_highlights_a_residual() -> None:
    result = make_result()
    page = report.render_html(result)
    assert "expected = matched + terms_mismatch + missing + voided + residual_expected" in page
    assert "ledger = matched + terms_mismatch + unexpected + duplicate + residual_ledger" in page
    assert 'class="residual nonzero"' not in page
    assert "identity does not hold" not in page
    result["bridge"]["residual_ledger"] = 3
    result["bridge"]["ledger"] = 249
    page = report.render_html(result)
    assert page.count('class="residual nonzero"') == 1
    assert re.search(r'<tr class="residual nonzero"><td>[^<]*</td><td class="num">3</td>', page)
    assert "identity does not hold" not in page  # 249 = 240 + 2 + 4 + 0 + 3
    result["bridge"]["ledger"] = 250
    assert "identity does not hold: ledger minus the terms leaves 4, the residual says 3" in report.render_html(result)


def test_html_breaks_tables_and_note() -> None:
    result = make_result(top_breaks=100, open_breaks=4_000)
    page = report.render_html(result)
    assert "showing 100 of 4,000 open breaks" in page
    assert page.count('<td class="id">b-') == 100
    for header in ("break id", "class", "user", "item", "partition", "detail"):
        assert f">{header}</th>" in page
    assert "1234567" in page and "expected amount 2000, not in ledger" in page
    breaks_by_class = re.search(r"<h2>Breaks by class</h2>.*?</table>", page, re.DOTALL)
    assert breaks_by_class
    assert re.findall(r"<td>([a-z ]+)</td><td class=\"num\">(\d+)</td>", breaks_by_class.group(0)) == [
        ("missing", "3"),
        ("unexpected", "4"),
        ("terms mismatch", "2"),
        ("duplicate", "0"),
    ]
    # More breaks than the table may show: the table is cut, the note says so.
    result = make_result(top_breaks=150, open_breaks=150)
    page = report.render_html(result)
    assert "showing 100 of 150 open breaks" in page
    assert page.count('<td class="id">b-') == 100


def test_optional_keys_may_be_missing_or_empty() -> None:
    result = make_result(states=[])
    for key in ("top_breaks", "breaks_by_class", "open_breaks", "explanation", "campaign_id", "snapshot_id"):
        del result[key]
    page = report.render_html(result)
    parsed = parse_page(page)
    assert parsed.verdict_text.strip() == "BREAKS"
    assert "chart-partitions-partition-cells" not in parsed.ids
    assert "no partitions" in comments_in(svg_section(page, "chart-partitions"))
    assert "showing 0 of 0 open breaks" in page
    assert "no break counts reported" in page
    image = decode_png(report.render_png(result))
    assert image.rgb_counts()[report.VERDICT_COLOURS["BREAKS"]] > 0
    no_items = make_result(skus=())
    page = report.render_html(no_items)
    assert not parse_page(page).groups("chart-items-bar-")
    assert "no items" in comments_in(svg_section(page, "chart-items"))
    assert decode_png(report.render_png(no_items)).width_px == report.PNG_WIDTH_PX


# --------------------------------------------------------------------------- layout


def test_collision_check_finds_overlapping_text() -> None:
    # The layout tests below pass only if this check can fail.
    figure = charts.items_figure(make_result())
    axes = figure.axes[0]
    axes.text(0, 0, "EMOTICON-90D-A", fontsize=12)
    axes.text(0, 0, "EMOTICON-90D-B", fontsize=12)
    problems = charts.text_collisions(figure)
    assert "'EMOTICON-90D-A' overlaps 'EMOTICON-90D-B'" in problems
    assert any(p.startswith("'EMOTICON-90D-A' overlaps bar-") for p in problems)
    figure.text(0.99, 0.5, "far too long to fit " * 5)
    assert any(p.endswith("leaves the figure") for p in charts.text_collisions(figure))


@pytest.mark.parametrize("result", [make_result(), fifty_item_result()], ids=["5 items", "50 items"])
def test_no_text_overlaps_other_text_or_bars(result: dict[str, Any]) -> None:
    for figure in (charts.items_figure(result), charts.partitions_figure(result), charts.report_figure(result)):
        assert charts.text_collisions(figure) == []
    # Every item keeps its own label on the axis: none cut away, none merged with a neighbour.
    labels = [t.get_text() for t in charts.items_figure(result).axes[0].get_yticklabels()]
    assert len(labels) == len(result["items"]) == len(set(labels))


def test_the_item_chart_grows_with_the_items_instead_of_squeezing_them() -> None:
    five = charts.items_figure(make_result()).get_size_inches()[1]
    fifty = charts.items_figure(fifty_item_result()).get_size_inches()[1]
    assert fifty - five == pytest.approx(45 * charts.ITEM_ROW_IN, abs=0.01)


# --------------------------------------------------------------------------- PNG


def test_png_is_a_valid_png_of_sensible_size() -> None:
    data = report.render_png(make_result())
    chunks = png_chunks(data)
    assert chunks[0][0] == b"IHDR" and b"IDAT" in {tag for tag, _ in chunks}
    width, height, depth, colour_type, *_ = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (width, depth, colour_type) == (report.PNG_WIDTH_PX, 8, 6)
    assert 400 <= height <= 1200, height
    image = decode_png(data)
    assert (image.width_px, image.height_px, image.channels) == (960, height, 4)
    assert set(image.pixels[3::4]) == {255}, "transparent pixels"
    assert len(image.rgb_counts()) > 5, "a blank image"
    assert 10_000 < len(data) < 500_000
    big = report.render_png(fifty_item_result())
    big_height = struct.unpack(">II", png_chunks(big)[0][1][:8])[1]
    assert height < big_height <= 6_000 and len(big) < 2_000_000


@pytest.mark.parametrize("verdict", ["RECONCILED", "BREAKS", "INCOMPLETE"])
def test_png_has_a_verdict_band_with_text(verdict: str) -> None:
    image = decode_png(report.render_png(make_result(verdict=verdict)))
    band = image.rgb_counts_in_rows(0, report.PNG_BAND_HEIGHT_PX)
    band_area = image.width_px * report.PNG_BAND_HEIGHT_PX
    assert band[report.VERDICT_COLOURS[verdict]] > band_area // 2
    white = band[(255, 255, 255)]
    assert 500 < white < band_area // 4, f"{white} white pixels: the verdict text is missing or the band is not drawn"
    below = image.rgb_counts_in_rows(report.PNG_BAND_HEIGHT_PX, report.PNG_BAND_HEIGHT_PX + 2)
    assert below[report.VERDICT_COLOURS[verdict]] == 0, "the band is taller than PNG_BAND_HEIGHT_PX"
    for other, colour in report.VERDICT_COLOURS.items():
        if other != verdict:
            assert image.rgb_counts()[colour] == 0


def test_png_shows_item_bars_and_every_partition_state() -> None:
    counts = decode_png(report.render_png(make_result())).rgb_counts()
    for series, colour in report.SERIES_COLOURS.items():
        assert counts[colour] > 5 * 10_000, series  # ten bars of 600 x 15 pixels or so
    for state, colour in report.PARTITION_STATE_COLOURS.items():
        assert counts[colour] > 5 * 400, state  # five or more cells of ~20 x 23 pixels


def test_png_partition_colours_follow_the_data() -> None:
    all_matched = decode_png(report.render_png(make_result(states=["matched"] * 128))).rgb_counts()
    half_breaks = decode_png(report.render_png(make_result(states=["matched", "breaks"] * 64))).rgb_counts()
    red = report.PARTITION_STATE_COLOURS["breaks"]
    green = report.PARTITION_STATE_COLOURS["matched"]
    assert all_matched[red] < 400  # the legend's swatch only
    assert half_breaks[red] > 50 * 400
    assert half_breaks[red] == pytest.approx(half_breaks[green], rel=0.05)


def test_png_never_hides_a_single_break_among_1024_partitions() -> None:
    states = ["matched"] * 1024
    baseline = decode_png(report.render_png(make_result(states=states))).rgb_counts()
    red = report.PARTITION_STATE_COLOURS["breaks"]
    for broken in (0, 517, 1023):
        states = ["matched"] * 1024
        states[broken] = "breaks"
        one_break = decode_png(report.render_png(make_result(states=states))).rgb_counts()
        assert one_break[red] - baseline[red] > 300, f"partition {broken}: its cell is not a visible red square"


def test_png_text_does_not_fail_on_characters_outside_the_font() -> None:
    result = make_result(skus=("쿠폰-₩2000", "emoticon<30d>", "x" * 200))
    result["campaign_id"] = "캠페인 2022 ✓"
    image = decode_png(report.render_png(result))
    assert image.width_px == report.PNG_WIDTH_PX


def test_same_input_gives_identical_bytes() -> None:
    result = make_result(states=[STATES[p % 4] for p in range(1024)])
    reordered = dict(reversed(list(copy.deepcopy(result).items())))
    assert report.render_html(result) == report.render_html(reordered)
    assert report.render_png(result) == report.render_png(reordered)
    assert report.render_html(result) != report.render_html(make_result(verdict="RECONCILED"))


# --------------------------------------------------------------------------- write_report


def test_write_report_writes_both_files_and_nothing_else(tmp_path: Path) -> None:
    out_dir = tmp_path / "reports" / "rec-1"  # created when missing
    result = make_result()
    html_path, png_path = report.write_report(result, out_dir)
    assert (html_path, png_path) == (out_dir / "report.html", out_dir / "report.png")
    assert html_path.read_text(encoding="utf-8") == report.render_html(result)
    assert png_path.read_bytes() == report.render_png(result)
    assert sorted(p.name for p in out_dir.iterdir()) == ["report.html", "report.png"]
    # A second run replaces the files in place.
    report.write_report(make_result(verdict="RECONCILED"), out_dir)
    assert parse_page(html_path.read_text(encoding="utf-8")).verdict_text.strip() == "RECONCILED"
    assert sorted(p.name for p in out_dir.iterdir()) == ["report.html", "report.png"]


def test_write_report_failure_keeps_the_old_file_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "report.html").write_text("previous report", encoding="utf-8")

    def refuse(source: object, destination: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="No space left"):
        report.write_report(make_result(), tmp_path)
    assert (tmp_path / "report.html").read_text(encoding="utf-8") == "previous report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_write_report_lets_os_errors_through(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("", encoding="utf-8")
    with pytest.raises(OSError):
        report.write_report(make_result(), blocker)


# --------------------------------------------------------------------------- real browser


def chromium_path() -> str:
    """The Chromium binary, or skip (fail when ENTITLE_REQUIRE_BROWSER=1) if there is none."""
    found = "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else shutil.which("chromium")
    if found is None:
        reason = "chromium is not installed; run ops/ensure_chromium.sh (as root) to install it"
        if os.environ.get("ENTITLE_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + " (ENTITLE_REQUIRE_BROWSER=1)")
        pytest.skip(reason)
    return found


def run_chromium(tmp_path: Path, *args: str) -> str:
    """Run headless Chromium with a throwaway profile; return its stdout."""
    command = [
        chromium_path(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--force-color-profile=srgb",  # exact colours in the screenshot, whatever the host display profile
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        *args,
    ]
    # Own process group, so a hung browser and every helper process it started can be killed together.
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=CHROMIUM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"chromium did not finish within {CHROMIUM_TIMEOUT_S} s: {' '.join(command)}")
    assert process.returncode == 0, (process.returncode, stderr[-2000:])
    return stdout


def browser_result() -> dict[str, Any]:
    """Sixteen partitions, wide bars: matched, breaks and not granted, but no unreadable one."""
    result = hostile_result()
    result["partitions"] = [
        {"partition_id": p, "state": ("matched", "breaks", "not_granted")[p % 3], "expected": 10, "live": 10}
        for p in range(16)
    ]
    return result


@pytest.mark.slow
def test_browser_renders_verdict_and_bars_into_the_dom(tmp_path: Path) -> None:
    result = browser_result()
    html_path, _ = report.write_report(result, tmp_path / "out")
    dom = run_chromium(tmp_path, "--dump-dom", html_path.as_uri())
    parsed = parse_page(dom)
    assert parsed.verdict_elements == 1
    assert parsed.verdict_text.strip() == "BREAKS"
    assert parsed.svg_ids == ["chart-items", "chart-partitions"]
    assert len(parsed.groups("chart-items-bar-")) == 2 * len(SKUS)
    assert len(parsed.groups("chart-items-count-")) == 2 * len(SKUS)
    cells = parsed.group_fills["chart-partitions-partition-cells"]
    colours = {hex_of(c): state for state, c in report.PARTITION_STATE_COLOURS.items()}
    assert [colours[fill] for fill in cells[:3]] == ["matched", "breaks", "not_granted"] and len(cells) == 16
    assert parsed.scripts == 0, "a <script> from the data became an element"
    assert SCRIPT_SKU in "".join(parsed.text)  # shown as text instead


@pytest.mark.slow
def test_browser_screenshot_shows_badge_and_bars(tmp_path: Path) -> None:
    result = browser_result()
    html_path, _ = report.write_report(result, tmp_path / "out")
    shot = tmp_path / "shot.png"
    run_chromium(
        tmp_path,
        f"--screenshot={shot}",
        f"--window-size={SCREENSHOT_WIDTH_PX},{SCREENSHOT_HEIGHT_PX}",
        html_path.as_uri(),
    )
    image = decode_png(shot.read_bytes())
    assert (image.width_px, image.height_px) == (SCREENSHOT_WIDTH_PX, SCREENSHOT_HEIGHT_PX)
    counts = image.rgb_counts()
    # The badge is a few hundred pixels wide; legend swatches are 12 x 12; bars are thousands of pixels each.
    large_px, legend_swatch_max_px = 3_000, 400
    assert counts[report.VERDICT_COLOURS["BREAKS"]] > large_px, "the verdict badge is not drawn in its colour"
    for series, colour in report.SERIES_COLOURS.items():
        assert counts[colour] > large_px, f"no {series} bars on screen"
    for state in ("matched", "breaks", "not_granted"):
        assert counts[report.PARTITION_STATE_COLOURS[state]] > large_px, f"no {state} partition bars on screen"
    # No partition is unreadable: its colour may only appear in the legend swatch.
    assert 0 < counts[report.PARTITION_STATE_COLOURS["unreadable"]] < legend_swatch_max_px
