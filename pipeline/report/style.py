"""Colours, sizes and limits shared by the charts and the page."""

from __future__ import annotations

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

SERIES_COLOURS: dict[str, RGB] = {
    "expected": (0x54, 0xAE, 0xFF),  # light blue
    "live": (0x05, 0x50, 0xAE),  # dark blue
}
SERIES = ("expected", "live")
BREAK_CLASSES = ("missing", "unexpected", "terms_mismatch", "duplicate")

INK: RGB = (0x1F, 0x23, 0x28)
MUTED_INK: RGB = (0x57, 0x60, 0x6A)
GRID: RGB = (0xD0, 0xD7, 0xDE)
WHITE: RGB = (0xFF, 0xFF, 0xFF)

TOP_BREAKS_SHOWN_MAX = 100
PROBLEM_PARTITIONS_SHOWN_MAX = 100  # partitions that are not matched, listed under the partition chart
SKU_LABEL_CHARS_MAX = 32  # longer skus are cut in the middle in chart labels; the tables keep the full sku
WON_SIGN = "\u20a9"  # ₩


def hex_colour(colour: RGB) -> str:
    """#rrggbb, as CSS and matplotlib both take it."""
    return "#{:02x}{:02x}{:02x}".format(*colour)


def verdict_colour(verdict: str) -> RGB:
    return VERDICT_COLOURS.get(verdict, UNKNOWN_VERDICT_COLOUR)


def state_colour(state: str) -> RGB:
    return PARTITION_STATE_COLOURS.get(state, UNKNOWN_STATE_COLOUR)


def state_label(state: str) -> str:
    return PARTITION_STATE_LABELS.get(state, state)
