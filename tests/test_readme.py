"""The README's result tables are generated from committed reports (tinyslim/experiments/readme.py)."""
import json
from pathlib import Path

import pytest

from tinyslim.experiments.readme import check_readme, render_readme

ROOT = Path(__file__).resolve().parent.parent


def test_every_generated_readme_block_is_what_its_report_gives():
    assert "<!-- generated: continual-table from " in (ROOT / "README.md").read_text()
    assert check_readme(ROOT / "README.md") == []


def test_a_hand_edited_number_is_caught(tmp_path):
    report = {"frontier": {"learned": "l", "kept": "k", "seeds": [0], "points": {
        "lora": [[{"lr": 1e-3, "learned": 0.5, "kept": 0.25, "acc": 0.3, "bwt": -0.1}]]}}}
    (tmp_path / "r.json").write_text(json.dumps(report))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- generated: frontier-table from r.json -->\nold\n<!-- end generated: frontier-table -->\nend\n")
    assert check_readme(readme) == ["frontier-table from r.json"]
    fresh = render_readme(readme.read_text(), tmp_path)
    assert "lora" in fresh and "  50.0   25.0" in fresh and fresh.endswith("end\n")
    readme.write_text(fresh)
    assert check_readme(readme) == []
    readme.write_text(fresh.replace("50.0", "51.0"))
    assert check_readme(readme) == ["frontier-table from r.json"]


def test_a_block_naming_a_missing_report_is_an_error(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- generated: claims from nowhere.json -->\nx\n<!-- end generated: claims -->\n")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_readme(readme)
