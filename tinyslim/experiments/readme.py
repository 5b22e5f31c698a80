"""The README's result tables are generated from committed reports, never typed in.

A block of the README between

    <!-- generated: NAME from PATH -->
    …
    <!-- end generated: NAME -->

is the output of ``BLOCKS[NAME](report)``, where report is the JSON at PATH (a report.json committed under
docs/results/). ``python -m tinyslim readme`` rewrites every such block; ``check_readme`` (a test) fails
when a block differs from what its report gives, so a number in the README is always the run's.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..io import atomic_write_bytes
from .continual import format_results
from .report import claims_table, format_frontier, format_seed_summary
from .tuning import format_tuning

__all__ = ["BLOCKS", "render_readme", "check_readme", "update_readme"]

_BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) from (?P<path>\S+) -->\n)(?P<body>.*?)"
                    r"(<!-- end generated: (?P=name) -->)", re.S)


def _header(doc: dict) -> str:
    t = doc["timings"]["total (wall)"]
    updates = "".join(f" Re-run in place: {', '.join(u['scenarios'])}, by `{u['command']}` ({u['wall_s'] / 60:.0f} min)."
                      for u in doc.get("updates", []))
    return (f"Made by `{doc['command']}` ({t / 60:.0f} min wall on {doc['workers']} worker processes); reported seeds "
            f"{', '.join(map(str, doc['seeds']))}, tuning seeds {', '.join(map(str, doc.get('tuning_seeds') or ['none']))}."
            + updates)


def _continual_table(doc: dict) -> str:
    c = doc["continual"]
    return "```\n" + format_results(c["summary"], list(c["config"]["tasks"]), c["base_general"]).split("\n\n")[0] + "\n```"


BLOCKS = {
    "claims": lambda doc: _header(doc) + "\n\n" + claims_table(doc["claims"]),
    "continual-table": lambda doc: _header(doc) + "\n\n" + _continual_table(doc),
    "frontier-table": lambda doc: "```\n" + format_frontier(doc["frontier"]) + "\n```",
    "tuning-table": lambda doc: "```\n" + format_tuning(doc["tuning"]) + "\n```",
    "seed-summary": lambda doc: "```\n" + format_seed_summary(doc) + "\n```",
}


def render_readme(text: str, root: Path) -> str:
    """The README text with every generated block rewritten from its report."""
    def fill(match):
        name, path = match.group("name"), root / match.group("path")
        if name not in BLOCKS:
            raise ValueError(f"README block {name!r} is not one of {sorted(BLOCKS)}")
        if not path.exists():
            raise FileNotFoundError(f"README block {name!r} reads {path}, which does not exist; run the command "
                                    "that writes it, or fix the path")
        doc = json.loads(path.read_text())
        return match.group(1) + BLOCKS[name](doc).rstrip("\n") + "\n" + match.group(5)

    return _BLOCK.sub(fill, text)


def check_readme(readme: Path) -> list[str]:
    """The names of the blocks whose text differs from what their report gives (empty: all agree)."""
    text = readme.read_text()
    fresh = render_readme(text, readme.parent)
    old = {f"{m.group('name')} from {m.group('path')}": m.group("body") for m in _BLOCK.finditer(text)}
    new = {f"{m.group('name')} from {m.group('path')}": m.group("body") for m in _BLOCK.finditer(fresh)}
    return [key for key in old if old[key] != new[key]]


def update_readme(readme: Path) -> list[str]:
    """Rewrite the README's generated blocks in place; returns the names of the blocks that changed."""
    changed = check_readme(readme)
    if changed:
        atomic_write_bytes(readme, render_readme(readme.read_text(), readme.parent).encode())
    return changed
