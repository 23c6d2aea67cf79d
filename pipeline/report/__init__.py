"""Render a reconciliation result as a self-contained HTML page and a PNG chart.

The HTML page works offline: inline CSS, charts as inline SVG, no scripts, no
fonts, no images, and a Content-Security-Policy that forbids loading anything.
It comes from a Jinja2 template with autoescaping on: skus, break details and
every other string taken from the result are user data and may contain markup.
The charts are drawn by matplotlib (Agg, never a GUI backend); the PNG holds
the same charts under a band in the verdict's colour. Face values are shown in
won (₩2,000), times in the campaign's time zone.

Both are deterministic: the same result gives byte-identical output, because
nothing depends on the clock, on randomness or on dict order we did not choose.

Modules: ``model`` (values from the result), ``charts`` (matplotlib), ``page``
(the template's context), ``style`` (colours and limits); the template is
``templates/report.html.j2``. matplotlib and Jinja2 are imported when a report
is rendered, not when this package is imported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.report.charts import PNG_BAND_HEIGHT_PX, PNG_WIDTH_PX, render_png
from pipeline.report.page import CONTENT_SECURITY_POLICY, render_html
from pipeline.report.style import (
    BREAK_CLASSES,
    PARTITION_STATE_COLOURS,
    PARTITION_STATE_LABELS,
    SERIES_COLOURS,
    TOP_BREAKS_SHOWN_MAX,
    UNKNOWN_STATE_COLOUR,
    UNKNOWN_VERDICT_COLOUR,
    VERDICT_COLOURS,
)

__all__ = [
    "BREAK_CLASSES",
    "CONTENT_SECURITY_POLICY",
    "HTML_FILENAME",
    "PARTITION_STATE_COLOURS",
    "PARTITION_STATE_LABELS",
    "PNG_BAND_HEIGHT_PX",
    "PNG_FILENAME",
    "PNG_WIDTH_PX",
    "SERIES_COLOURS",
    "TOP_BREAKS_SHOWN_MAX",
    "UNKNOWN_STATE_COLOUR",
    "UNKNOWN_VERDICT_COLOUR",
    "VERDICT_COLOURS",
    "render_html",
    "render_png",
    "write_report",
]

HTML_FILENAME = "report.html"
PNG_FILENAME = "report.png"


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
