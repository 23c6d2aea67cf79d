"""pipeline.report: the HTML page and the PNG chart of a reconciliation, checked as bytes and in real Chromium.

The PNG checks decode the image with a small decoder written here (zlib and the
five standard row filters), so they test the pixels, not the encoder's intent.
The browser tests open the written page in headless Chromium and check both the
DOM it built and the pixels of a screenshot.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import signal
import struct
import subprocess
import zlib
from collections import Counter
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from pipeline import report

CHROMIUM_TIMEOUT_S = 60
SCREENSHOT_WIDTH_PX = 1200
SCREENSHOT_HEIGHT_PX = 1600
STATES = ("matched", "breaks", "not_granted", "unreadable")
SKUS = ("emoticon-permanent", "emoticon-30d", "emoticon-90d", "coupon-2000", "coupon-3000")
SCRIPT_SKU = '<script>alert("sku")</script>'
SCRIPT_DETAIL = "<script>alert('detail')</script> expected amount 2000, not in ledger"
# Attributes that make a browser fetch something; a self-contained page has none of them.
FETCHING_ATTRIBUTES = {"src", "href", "xlink:href", "srcset", "action", "formaction", "poster", "data", "background"}


# --------------------------------------------------------------------------- inputs


def make_result(
    verdict: str = "BREAKS",
    skus: tuple[str, ...] = SKUS,
    states: list[str] | None = None,
    top_breaks: int = 9,
    open_breaks: int = 9,
) -> dict[str, Any]:
    """A reconciliation result shaped like the reconciliation's output; 128 partitions cycling through the states."""
    if states is None:
        states = [STATES[p % len(STATES)] if p % 5 == 0 else "matched" for p in range(128)]
    items = [
        {
            "item_sku": sku,
            "expected": 50,
            "live": 50 - index,
            "matched": 50 - index,
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
    result["campaign_id"] = 'camp"aign<&>'
    result["explanation"] = "<img src=x onerror=alert(1)> broke"
    return result


# --------------------------------------------------------------------------- HTML parsing


class PageParser(HTMLParser):
    """Collects what the tests look at: the verdict text, bars per SVG, scripts and every attribute name."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.verdict_text = ""
        self.verdict_elements = 0
        self.bars: dict[str, list[dict[str, str]]] = {}
        self.bar_titles: dict[str, list[str]] = {}
        self.scripts = 0
        self.attribute_names: set[str] = set()
        self.style_values: list[str] = []
        self.text: list[str] = []
        self._verdict_depth = 0
        self._svg_id: str | None = None
        self._in_bar_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        self.attribute_names.update(values)
        if "style" in values:
            self.style_values.append(values["style"])
        if tag == "script":
            self.scripts += 1
        if self._verdict_depth:
            self._verdict_depth += 1
        elif values.get("id") == "verdict":
            self.verdict_elements += 1
            self._verdict_depth = 1
        if tag == "svg":
            self._svg_id = values.get("id", "")
        if tag == "rect" and "bar" in values.get("class", "").split() and self._svg_id is not None:
            self.bars.setdefault(self._svg_id, []).append(values)
            self.bar_titles.setdefault(self._svg_id, []).append("")
        if tag == "title" and self._svg_id is not None and self.bars.get(self._svg_id):
            self._in_bar_title = True

    def handle_endtag(self, tag: str) -> None:
        if self._verdict_depth:
            self._verdict_depth -= 1
        if tag == "svg":
            self._svg_id = None
        if tag == "title":
            self._in_bar_title = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._verdict_depth:
            self.verdict_text += data
        if self._in_bar_title and self._svg_id is not None:
            self.bar_titles[self._svg_id][-1] += data


def parse_page(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    parser.close()
    return parser


def svg_section(page: str, svg_id: str) -> str:
    match = re.search(rf'<svg[^>]*\bid="{svg_id}".*?</svg>', page, re.DOTALL)
    assert match, f"no <svg id={svg_id}>"
    return match.group(0)


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
    assert data[:8] == report.PNG_SIGNATURE, data[:8]
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
    png = report.PNG_SIGNATURE + report._png_chunk(b"IHDR", header)
    png += report._png_chunk(b"IDAT", zlib.compress(filtered)) + report._png_chunk(b"IEND", b"")
    image = decode_png(png)
    assert image.pixels == b"".join(original)
    assert image.filter_types == {0, 1, 2, 3, 4}


# --------------------------------------------------------------------------- colours


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


def test_font_covers_letters_digits_and_punctuation() -> None:
    for char in "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.,:%/()_ ?":
        glyph = report.FONT_5X7[char]
        assert len(glyph) == report.GLYPH_HEIGHT_PX, char
        assert all(0 <= bits < 2**report.GLYPH_WIDTH_PX for bits in glyph), char
        assert any(glyph) or char == " ", f"glyph {char!r} is blank"
    glyphs = [report.FONT_5X7[c] for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"]
    assert len(set(glyphs)) == len(glyphs), "two characters share a glyph"


# --------------------------------------------------------------------------- HTML


@pytest.mark.parametrize("verdict", ["RECONCILED", "BREAKS", "INCOMPLETE"])
def test_html_shows_verdict_in_badge_with_its_colour_and_explanation(verdict: str) -> None:
    page = report.render_html(make_result(verdict=verdict))
    parsed = parse_page(page)
    assert parsed.verdict_elements == 1
    assert parsed.verdict_text.strip() == verdict
    assert "3 missing grants and 4 unexpected grants are not explained by voids" in "".join(parsed.text)
    colour = "#{:02x}{:02x}{:02x}".format(*report.VERDICT_COLOURS[verdict])
    assert re.search(rf"#verdict\s*\{{\s*background:\s*{colour}", page), f"badge is not {colour}"
    assert "<title>Reconciliation " in page and "kakao-outage-2022</title>" in page


def test_html_escapes_every_string_from_the_result() -> None:
    page = report.render_html(hostile_result())
    parsed = parse_page(page)
    assert "<script" not in page.lower()
    assert "<img" not in page.lower()
    assert parsed.scripts == 0
    assert "onerror" not in parsed.attribute_names
    text = "".join(parsed.text)
    # The markup survives as text the reader can see, in the chart labels, tooltips and the breaks table.
    assert text.count(SCRIPT_SKU) >= 3
    assert SCRIPT_DETAIL in text
    assert "<img src=x onerror=alert(1)> broke" in text
    assert 'camp"aign<&>' in text
    assert "&lt;script&gt;alert(&quot;sku&quot;)&lt;/script&gt;" in page


def test_html_is_self_contained() -> None:
    page = report.render_html(hostile_result())
    parsed = parse_page(page)
    assert not parsed.attribute_names & FETCHING_ATTRIBUTES, parsed.attribute_names & FETCHING_ATTRIBUTES
    assert "http://" not in page and "https://" not in page
    for construct in ("url(", "@import", "<link", "<iframe", "<object", "<embed", "<script"):
        assert construct not in page.lower(), construct
    assert "default-src 'none'" in page  # and the browser would refuse to fetch anything anyway


def test_html_has_one_bar_per_item_and_series_with_heights_in_proportion() -> None:
    result = make_result()
    result["items"][0]["live"] = 25  # half of expected
    parsed = parse_page(report.render_html(result))
    bars = parsed.bars["chart-items"]
    assert len(bars) == 2 * len(SKUS)
    assert Counter(bar["data-series"] for bar in bars) == {"expected": len(SKUS), "live": len(SKUS)}
    expected_height = float(bars[0]["height"])
    live_height = float(bars[1]["height"])
    assert bars[0]["data-series"] == "expected" and bars[1]["data-series"] == "live"
    assert expected_height > 0
    assert live_height == pytest.approx(expected_height / 2, abs=0.02)
    assert parsed.bar_titles["chart-items"][:2] == ["emoticon-permanent: expected 50", "emoticon-permanent: live 25"]
    section = svg_section(report.render_html(result), "chart-items")
    assert "grants</text>" in section and "item</text>" in section  # axis titles
    assert ">50</text>" in section and ">0</text>" in section  # axis tick labels


@pytest.mark.parametrize("partition_count", [1, 128, 1024])
def test_html_has_one_bar_per_partition_coloured_by_state(partition_count: int) -> None:
    states = [STATES[(p * 7) % len(STATES)] for p in range(partition_count)]
    result = make_result(states=states)
    result["partitions"].reverse()  # the chart orders by partition id, whatever order they came in
    parsed = parse_page(report.render_html(result))
    bars = parsed.bars["chart-partitions"]
    assert len(bars) == partition_count
    for pid, (bar, title) in enumerate(zip(bars, parsed.bar_titles["chart-partitions"], strict=True)):
        assert title.startswith(f"partition {pid}: "), title
        assert bar["data-state"] == states[pid]
        assert bar["fill"] == "#{:02x}{:02x}{:02x}".format(*report.PARTITION_STATE_COLOURS[states[pid]])
        assert float(bar["width"]) > 0
    xs = [float(bar["x"]) for bar in bars]
    assert xs == sorted(xs) and len(set(xs)) == len(xs), "bars overlap or are out of order"


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
    assert "chart-partitions" not in parsed.bars
    assert "no partitions" in page
    assert "showing 0 of 0 open breaks" in page
    assert "no break counts reported" in page
    image = decode_png(report.render_png(result))
    assert image.rgb_counts()[report.VERDICT_COLOURS["BREAKS"]] > 0
    no_items = make_result(skus=())
    assert "chart-items" not in parse_page(report.render_html(no_items)).bars
    assert decode_png(report.render_png(no_items)).width_px == report.PNG_WIDTH_PX


# --------------------------------------------------------------------------- PNG


def test_png_is_a_valid_rgb_image_of_the_declared_size() -> None:
    data = report.render_png(make_result())
    chunks = png_chunks(data)
    assert [tag for tag, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    assert struct.unpack(">IIBBBBB", chunks[0][1]) == (960, 540, 8, 2, 0, 0, 0)
    image = decode_png(data)
    assert (image.width_px, image.height_px, image.channels) == (960, 540, 3)
    assert image.filter_types == {0}
    assert len(image.rgb_counts()) > 5, "a blank image"


@pytest.mark.parametrize("verdict", ["RECONCILED", "BREAKS", "INCOMPLETE"])
def test_png_has_a_verdict_band_with_text(verdict: str) -> None:
    image = decode_png(report.render_png(make_result(verdict=verdict)))
    band = image.rgb_counts_in_rows(0, report.PNG_BAND_HEIGHT_PX)
    band_area = image.width_px * report.PNG_BAND_HEIGHT_PX
    assert band[report.VERDICT_COLOURS[verdict]] > band_area // 2
    white = band[(255, 255, 255)]
    assert 500 < white < band_area // 4, f"{white} white pixels: the verdict text is missing or the band is not drawn"
    for other, colour in report.VERDICT_COLOURS.items():
        if other != verdict:
            assert image.rgb_counts()[colour] == 0


def test_png_shows_item_bars_and_every_partition_state() -> None:
    image = decode_png(report.render_png(make_result()))
    counts = image.rgb_counts()
    swatch_area = report.PNG_SWATCH_PX**2  # each colour also appears once in a legend
    for series, colour in report.SERIES_COLOURS.items():
        assert counts[colour] > 20 * swatch_area, series
    for state, colour in report.PARTITION_STATE_COLOURS.items():
        assert counts[colour] > 5 * swatch_area, state


def test_png_partition_colours_follow_the_data() -> None:
    all_matched = decode_png(report.render_png(make_result(states=["matched"] * 128))).rgb_counts()
    half_breaks = decode_png(report.render_png(make_result(states=["matched", "breaks"] * 64))).rgb_counts()
    red = report.PARTITION_STATE_COLOURS["breaks"]
    green = report.PARTITION_STATE_COLOURS["matched"]
    swatch_area = report.PNG_SWATCH_PX**2
    assert all_matched[red] == swatch_area  # only the legend
    assert half_breaks[red] > 50 * swatch_area
    assert half_breaks[red] == pytest.approx(half_breaks[green], rel=0.05)


def test_png_never_hides_a_single_break_among_1024_partitions() -> None:
    # 1024 partitions are wider than the plot, so some pixel columns cover two partitions; every one of
    # eight neighbours in turn is the only break, which puts it first in its column and, for some, second.
    states = ["matched"] * 1024
    baseline = decode_png(report.render_png(make_result(states=states))).rgb_counts()
    red = report.PARTITION_STATE_COLOURS["breaks"]
    plot_height_px = report.PNG_PARTITION_PLOT_BOTTOM_PX - report.PNG_PARTITION_PLOT_TOP_PX
    for broken in range(512, 520):
        states = ["matched"] * 1024
        states[broken] = "breaks"
        one_break = decode_png(report.render_png(make_result(states=states))).rgb_counts()
        assert one_break[red] - baseline[red] == plot_height_px, f"partition {broken}: not one full red column"


def test_png_text_does_not_fail_on_characters_outside_the_font() -> None:
    result = make_result(skus=("쿠폰-₩2000", "emoticon<30d>", "x" * 200))
    result["campaign_id"] = "캠페인 2022 ✓"
    image = decode_png(report.render_png(result))
    assert image.width_px == report.PNG_WIDTH_PX


def test_1024_partitions_give_one_bar_each() -> None:
    # Rendering time is measured by bench/bench.py, not asserted here (no timed tests).
    result = make_result(states=[STATES[p % 4] for p in range(1024)], top_breaks=100, open_breaks=5_000)
    page = report.render_html(result)
    image = report.render_png(result)
    assert page.count('<rect class="bar"') == 1024 + 2 * len(SKUS)
    assert decode_png(image).height_px == report.PNG_HEIGHT_PX


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
    assert len(parsed.bars.get("chart-items", [])) == 2 * len(SKUS)
    assert len(parsed.bars.get("chart-partitions", [])) == 16
    assert [bar["data-state"] for bar in parsed.bars["chart-partitions"][:3]] == ["matched", "breaks", "not_granted"]
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
