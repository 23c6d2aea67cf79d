"""The HTML page: a Jinja2 template (autoescaped) filled with values from the result and the charts as SVG.

Everything taken from the result reaches the template as plain strings and
numbers, so autoescaping escapes it; only the SVG from ``charts`` is marked
safe (matplotlib escapes the text it writes, and with glyphs drawn as paths no
text from the result appears in it anyway).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.report import charts, model
from pipeline.report.style import (
    BREAK_CLASSES,
    PROBLEM_PARTITIONS_SHOWN_MAX,
    TOP_BREAKS_SHOWN_MAX,
    hex_colour,
    state_colour,
    state_label,
    verdict_colour,
)

if TYPE_CHECKING:
    import jinja2

TEMPLATE = "report.html.j2"

# Nothing may be fetched: no scripts, no fonts, no images, no frames; only the inline stylesheet.
CONTENT_SECURITY_POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src 'none'; base-uri 'none'"

BRIDGE_SIDES = (
    (
        "Expected side",
        ("expected", "expected grants"),
        (("matched", "matched"), ("terms_mismatch", "terms mismatch"), ("missing", "missing"), ("voided", "voided")),
        ("residual_expected", "residual (unexplained)"),
    ),
    (
        "Ledger side",
        ("ledger", "ledger grants"),
        (
            ("matched", "matched"),
            ("terms_mismatch", "terms mismatch"),
            ("unexpected", "unexpected"),
            ("duplicate", "duplicate"),
        ),
        ("residual_ledger", "residual (unexplained)"),
    ),
)
TOP_BREAK_COLUMNS = (
    ("break_id", "break id", "id"),
    ("break_class", "class", ""),
    ("user_id", "user", "num"),
    ("item_sku", "item", ""),
    ("partition_id", "partition", "num"),
    ("detail", "detail", "detail"),
)


def render_html(result: Mapping[str, Any]) -> str:
    """Render the reconciliation result as one self-contained HTML page."""
    from markupsafe import Markup

    context = page_context(result)
    # The charts' SVG is matplotlib's (which escapes what text it writes); everything else is escaped.
    context["charts"] = {name: Markup(svg) for name, svg in charts.render_svgs(result).items()}
    return _environment().get_template(TEMPLATE).render(context)


@functools.cache
def _environment() -> jinja2.Environment:
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("pipeline.report", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "j2"), default_for_string=True, default=True),
        undefined=jinja2.StrictUndefined,  # a misspelt name in the template fails, it does not render empty
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


# --------------------------------------------------------------------------- context


@dataclass(frozen=True)
class BridgeRow:
    label: str
    value: str
    css: str = ""


@dataclass(frozen=True)
class BridgeSide:
    caption: str
    rows: list[BridgeRow]
    identity: str
    warning: str | None


def page_context(result: Mapping[str, Any]) -> dict[str, Any]:
    """Plain values for the template (strings and numbers: the template escapes them)."""
    from markupsafe import Markup

    terms = model.campaign_terms(result)
    verdict = str(result["verdict"])
    started = model.local_time(result.get("started_at"), terms.zone)
    finished = model.local_time(result.get("finished_at"), terms.zone)
    partitions = model.partition_rows(result)
    return {
        "csp": Markup(CONTENT_SECURITY_POLICY),  # a constant of ours, quotes and all
        "verdict": verdict,
        "verdict_css_class": f"verdict-{verdict.lower()}",
        "verdict_colour": hex_colour(verdict_colour(verdict)),
        "campaign_id": model.text(result.get("campaign_id")),
        "explanation": model.text(result.get("explanation")),
        "meta": [
            ("reconciliation", model.text(result.get("reconciliation_id")), None),
            ("snapshot", model.text(result.get("snapshot_id")), None),
            ("started", started.shown, started.iso),
            ("finished", finished.shown, finished.iso),
            ("time zone", terms.time_zone, None),
        ],
        "bridge": _bridge(result.get("bridge")),
        "items": model.item_rows(result, terms),
        "partitions": _partitions(partitions),
        "breaks_by_class": _breaks_by_class(result.get("breaks_by_class")),
        "top_breaks": _top_breaks(result),
    }


def _bridge(raw: object) -> list[BridgeSide]:
    bridge: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    sides = []
    for caption, (total_key, total_label), terms, (residual_key, residual_label) in BRIDGE_SIDES:
        total_value, residual_value = bridge.get(total_key), bridge.get(residual_key)
        rows = [BridgeRow(total_label, model.thousands(total_value), "total")]
        rows += [
            BridgeRow(f"{'=' if position == 0 else '+'} {label}", model.thousands(bridge.get(key)))
            for position, (key, label) in enumerate(terms)
        ]
        nonzero = " nonzero" if residual_value != 0 else ""
        rows.append(BridgeRow(f"+ {residual_label}", model.thousands(residual_value), f"residual{nonzero}"))
        identity = f"{total_key} = " + " + ".join([key for key, _ in terms] + [residual_key])
        # The residual is defined as what the terms leave over; if the numbers disagree the bridge itself is wrong.
        warning = None
        values = [bridge.get(key) for key, _ in terms] + [total_value, residual_value]
        if all(model.is_int(v) for v in values):
            left_over = model.count(total_value) - sum(model.count(bridge.get(key)) for key, _ in terms)
            if left_over != residual_value:
                warning = (
                    f"identity does not hold: {total_key} minus the terms leaves {left_over:,}, "
                    f"the residual says {model.thousands(residual_value)}"
                )
        sides.append(BridgeSide(caption, rows, identity, warning))
    return sides


def _partitions(partitions: list[model.PartitionRow]) -> dict[str, Any]:
    problems = [p for p in partitions if p.state != "matched"]
    return {
        "count": len(partitions),
        "problems": [
            {
                "partition_id": p.partition_id,
                "state": state_label(p.state),
                "colour": hex_colour(state_colour(p.state)),
                "expected": model.thousands(p.expected),
                "live": model.thousands(p.live),
                "breaks": model.thousands(p.breaks),
                "error": "" if p.error is None else model.text(p.error),
            }
            for p in problems[:PROBLEM_PARTITIONS_SHOWN_MAX]
        ],
        "problem_count": len(problems),
    }


def _breaks_by_class(raw: object) -> dict[str, Any] | None:
    if not isinstance(raw, Mapping) or not raw:
        return None
    # The known classes first in a fixed order, then anything new in the order it came.
    keys = [k for k in BREAK_CLASSES if k in raw] + [k for k in raw if k not in BREAK_CLASSES]
    return {
        "rows": [(str(key).replace("_", " "), model.thousands(raw[key])) for key in keys],
        "total": f"{sum(model.count(raw[key]) for key in keys):,}",
    }


def _top_breaks(result: Mapping[str, Any]) -> dict[str, Any]:
    raw = result.get("top_breaks")
    entries = [b for b in raw if isinstance(b, Mapping)] if isinstance(raw, list) else []
    shown = entries[:TOP_BREAKS_SHOWN_MAX]
    open_breaks = result.get("open_breaks")
    total = open_breaks if model.is_int(open_breaks) else len(entries)
    return {
        "note": f"showing {len(shown):,} of {total:,} open breaks",
        "columns": [(title, css) for _, title, css in TOP_BREAK_COLUMNS],
        "rows": [[(model.text(entry.get(key)), css) for key, _, css in TOP_BREAK_COLUMNS] for entry in shown],
    }
