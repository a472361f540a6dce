"""One palette for every figure: a colour per node status, per decoding method and per verification rule.

Taught in: every notebook (the same method keeps the same colour in every figure).
"""

from __future__ import annotations

COLORS = {  # fill colours by node status
    "root": "#ffd966",
    "accepted": "#7fc97f",
    "verified": "#fdc086",
    "rejected": "#f4cccc",
    "drafted": "#cfe2f3",
    "more": "#ffffff",
}


STATUS_TEXT = {
    "root": "root (last token)",
    "accepted": "accepted path",
    "verified": "verified, but an ancestor was rejected",
    "rejected": "rejected",
    "drafted": "drafted (not verified here)",
    "more": "collapsed siblings",
}


PATH_EDGE = "#1b7837"


METHOD_COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"]


def _html(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
