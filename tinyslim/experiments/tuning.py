"""Tuning on tuning seeds only, with the same budget for every method: the settings scenario A reports.

The seeds split in two disjoint sets:

    TUNING_SEEDS   = 100, 101, 102   every knob is chosen here (``python -m tinyslim tune``)
    REPORTED_SEEDS = 0, 1, 2, 3, 4   every claim is judged here, with the settings chosen above

Every tuned method gets a grid of exactly GRID_SIZE settings, run on every tuning seed at the size
being tuned. Methods whose only open knob is the learning rate get the shared learning-rate grid; SLIM,
whose paper leaves γ, the L1 coefficient and the drop ratio p open, spends the same budget on those at
the scenario's learning rate. The choice (``select``) is one rule for every method, fixed before any
run:

    among the settings whose mean learned accuracy (the accuracy-matrix diagonal) is ≥ 0.9, the one
    with the highest mean ACC + kept (kept = top-1 agreement with the base after the last task);
    if none learns to 0.9, the one that learned most.

ACC + kept is what continual fine-tuning wants on both sides: the tasks at the end, and the base.

The grid, every run's numbers and the choice are data: ``tuning/<size>.json`` beside this file, written
by ``python -m tinyslim tune --size quick`` and read by the suite (the tiny size reads quick's). Rows that are not tuned: SLIM's
ablation rows take SLIM's chosen setting and change one component; ``slim-spec`` is SLIM at the
documented defaults on the scenario's learning rate; scenarios B and C run their documented defaults.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..io import atomic_write_bytes
from .continual import ContinualConfig
from .jobs import Job, run_jobs

__all__ = ["TUNING_SEEDS", "REPORTED_SEEDS", "GRID_SIZE", "LR_GRID", "TUNING_GRIDS", "UNTUNED_ROWS", "select",
           "tuning_path", "load_tuning", "settings_for", "run_tuning", "format_tuning"]

TUNING_SEEDS = (100, 101, 102)
REPORTED_SEEDS = (0, 1, 2, 3, 4)
GRID_SIZE = 4
LEARNED_FLOOR = 0.9  # the calibration target: a method must learn its tasks before forgetting means anything

LR_GRID = (1e-3, 2e-3, 4e-3, 8e-3)
_LR_ONLY = [{"lr": lr} for lr in LR_GRID]
TUNING_GRIDS = {
    "lora": _LR_ONLY, "er": _LR_ONLY, "ilora": _LR_ONLY, "cola": _LR_ONLY, "moe_lora": _LR_ONLY,
    # the parameter-matched LoRAs (the nearest rank to moe_lora's and SLIM's trainable-parameter counts)
    "lora-r34": _LR_ONLY, "lora-r35": _LR_ONLY,
    # SLIM's paper-silent knobs at the scenario's learning rate: the documented defaults, then without the
    # masks and L1, at two strengths of yielding, and yielding at 0.5 with L1 kept
    "slim": [{"gamma": 1.0, "l1_coef": 1e-3, "drop_p": 0.3}, {"gamma": 1.0, "l1_coef": 0.0, "drop_p": 0.0},
             {"gamma": 0.5, "l1_coef": 0.0, "drop_p": 0.0}, {"gamma": 0.5, "l1_coef": 1e-3, "drop_p": 0.0}],
}
assert all(len(g) == GRID_SIZE for g in TUNING_GRIDS.values()), "every method gets the same grid size"
# rows whose setting comes from another row's choice ("inherit") or is fixed ("fixed")
UNTUNED_ROWS = {"slim-no-identity": ("inherit", "slim"), "slim-no-yielding": ("inherit", "slim"),
                "slim-spec": ("fixed", {})}


def split_setting(setting: dict) -> tuple[float | None, dict]:
    """(the scenario's learning rate or None, the method-config overrides) of one grid setting."""
    rest = {k: v for k, v in setting.items() if k != "lr"}
    return setting.get("lr"), rest


def select(scores: list[dict]) -> int:
    """The index of the chosen setting among per-setting means {"learned", "acc", "kept"} (the rule above)."""
    ok = [i for i, s in enumerate(scores) if s["learned"] >= LEARNED_FLOOR]
    if ok:
        return max(ok, key=lambda i: scores[i]["acc"] + scores[i]["kept"])
    return max(range(len(scores)), key=lambda i: scores[i]["learned"])


# the tiny size (the tests' smoke run) exercises the quick size's code paths, so it reads the quick size's choices
TUNING_OF_SIZE = {"tiny": "quick"}


def tuning_path(size: str) -> Path:
    return Path(__file__).with_name("tuning") / f"{TUNING_OF_SIZE.get(size, size)}.json"


def load_tuning(size: str) -> dict | None:
    """The committed tuning document of a size, or None when that size was never tuned."""
    path = tuning_path(size)
    return json.loads(path.read_text()) if path.exists() else None


def settings_for(name: str, tuning: dict | None) -> tuple[float | None, dict, str]:
    """(lr or None for the scenario's, method overrides, where it came from) for a scenario-A row."""
    if name in UNTUNED_ROWS:
        kind, what = UNTUNED_ROWS[name]
        if kind == "fixed":
            return None, dict(what), "fixed: the documented defaults"
        lr, overrides, _ = settings_for(what, tuning)
        return lr, overrides, f"{what}'s tuned setting"
    if tuning is None or name not in tuning["methods"]:
        return None, {}, "untuned: the scenario's defaults"
    lr, overrides = split_setting(tuning["methods"][name]["chosen"])
    return lr, overrides, f"tuned on seeds {', '.join(map(str, tuning['tuning_seeds']))}"


def tuning_job(base_model, name: str, config: ContinualConfig, setting: dict, seed: int, progress: bool) -> dict:
    from .suite import continual_job

    lr, overrides = split_setting(setting)
    cfg = config if lr is None else ContinualConfig(**{**config.to_dict(), "lr": lr})
    r = continual_job(base_model, name, cfg, seed, overrides, False, progress)
    return {"learned": r["learning_acc"], "acc": r["acc"], "kept": r["final_general"]["agreement"],
            "bwt": r["bwt"], "wall_s": r["wall_s"]}


def run_tuning(base_model, size: str = "quick", seeds=TUNING_SEEDS, methods=None, workers: int = 1,
               progress: bool = True, log=print) -> dict:
    """Every tuned method's grid on every tuning seed; the tuning document (see the module docstring)."""
    from .suite import suite_configs

    seeds = [int(s) for s in seeds]
    overlap = sorted(set(seeds) & set(REPORTED_SEEDS))
    if overlap:
        raise ValueError(f"tuning seeds {overlap} are reported seeds ({list(REPORTED_SEEDS)}); tune on others, "
                         f"e.g. {list(TUNING_SEEDS)}")
    methods = list(methods or TUNING_GRIDS)
    unknown = [m for m in methods if m not in TUNING_GRIDS]
    if unknown:
        raise ValueError(f"no tuning grid for {unknown}; tuned methods are {sorted(TUNING_GRIDS)}")
    config = suite_configs(size)["continual"]
    inline = progress and workers == 1
    jobs = [Job(f"{m} #{i} seed {s}", tuning_job, (m, config, setting, s, inline))
            for m in methods for i, setting in enumerate(TUNING_GRIDS[m]) for s in seeds]
    t0 = time.perf_counter()
    results, _, used = run_jobs(jobs, base_model, workers, log, progress)
    doc = {"size": size, "tuning_seeds": seeds, "grid_size": GRID_SIZE, "learned_floor": LEARNED_FLOOR,
           "rule": f"among settings with mean learned >= {LEARNED_FLOOR}, the highest mean ACC + kept; "
                   "else the highest mean learned",
           "command": f"python -m tinyslim tune --size {size}", "workers": used,
           "wall_s": time.perf_counter() - t0, "config": config.to_dict(), "methods": {}}
    for m in methods:
        rows = []
        for i, setting in enumerate(TUNING_GRIDS[m]):
            runs = [results[f"{m} #{i} seed {s}"] for s in seeds]
            means = {k: float(np.mean([r[k] for r in runs])) for k in ("learned", "acc", "kept", "bwt")}
            rows.append({"setting": setting, "runs": runs, "mean": means})
        chosen = select([r["mean"] for r in rows])
        doc["methods"][m] = {"grid": rows, "chosen_index": chosen, "chosen": rows[chosen]["setting"]}
    return doc


def write_tuning(doc: dict, path: Path | None = None) -> Path:
    path = Path(path or tuning_path(doc["size"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(doc, indent=1) + "\n").encode())
    return path


def format_tuning(doc: dict) -> str:
    """The tuning grid as a table: every setting's means over the tuning seeds, the chosen one marked."""
    lines = [f"Tuning at size {doc['size']} on seeds {', '.join(map(str, doc['tuning_seeds']))} "
             f"({doc['grid_size']} settings per method; `{doc['command']}`). Rule: {doc['rule']}.",
             f"{'method':<10} {'setting':<36} {'learned':>8} {'ACC':>6} {'kept':>6} {'BWT':>7}"]
    for m, t in doc["methods"].items():
        for i, row in enumerate(t["grid"]):
            s = ", ".join(f"{k} {v:g}" for k, v in row["setting"].items())
            mark = "  ← chosen" if i == t["chosen_index"] else ""
            mean = row["mean"]
            lines.append(f"{m:<10} {s:<36} {100 * mean['learned']:8.1f} {100 * mean['acc']:6.1f} "
                         f"{100 * mean['kept']:6.1f} {100 * mean['bwt']:7.1f}{mark}")
    return "\n".join(lines)
