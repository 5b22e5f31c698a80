"""Every world at one size: what ``python -m tinyslim demo`` and ``run all`` execute.

``run_suite`` runs, for each seed, on the same base model:

    continual    scenario A: every method of ``continual_methods`` through the task sequence
                 (SLIM's routing shares measured at the end: identity vs LoRA experts on task lines
                 against pydoc text)
    chain        COLA's claim on one task a small rank underfits: chains of m = 1, 2, 3 links at the
                 same step budget (m = 1 is plain LoRA)
    composition  scenario B: K single-task LoRAs, composed by sum, NLA and MoLE (with and without L_bal)
    editing      scenario C: an edit stream, ELDER against FT-LoRA, metrics against stream length

and returns one JSON-able document (the report's data; report.py turns it into tables, claims and
plots). Sizes: "quick" (the demo: one seed in a few minutes on 2 cores), "full" (each scenario's own
calibrated defaults, minutes per method and seed), "tiny" (seconds; the test suite's size, whose
numbers mean nothing).
"""
from __future__ import annotations

import time

import numpy as np

from .composition import CompositionConfig, run_composition
from .continual import ContinualConfig, _jsonable, build_method, run_continual, run_methods
from . import metrics
from .editing import EditingConfig, run_editing

__all__ = ["SIZES", "SCENARIOS", "suite_configs", "run_suite", "run_chain_study", "slim_routing_shares"]

SCENARIOS = ("continual", "chain", "composition", "editing")

# scenario A's rows: the methods, then SLIM's ablation rows (methods.md §7.3)
CONTINUAL_METHODS = ("lora", "er", "ilora", "cola", "moe_lora", "slim",
                     "slim-no-identity", "slim-no-yielding", "slim-no-masks")

SIZES = {
    # Calibrated on the shipped base (seed 0, one BLAS thread): 3 tasks × 600 steps, Seq-LoRA learns each
    # task to 98–100% and keeps 0% of it one task later (BWT −99); 400 steps at lr 6e-3 learned only 4–85%.
    "quick": {
        "continual": dict(tasks=("rev", "cap", "sft"), steps=600, n_test=100, eval_batches=2),
        "continual_methods": CONTINUAL_METHODS,
        "chain": dict(task="srt", rank=1, steps=600, links=(1, 2, 3), n_test=100),
        "composition": dict(tasks=("rev", "cap", "sft"), source_steps=600, mole_steps=200, n_test=100,
                            eval_batches=2),
        "editing": dict(stream_lengths=(10, 50)),
    },
    # each scenario's own defaults (5 tasks × 800 steps; the editing stream up to 100 edits)
    "full": {
        "continual": dict(),
        "continual_methods": CONTINUAL_METHODS,
        "chain": dict(task="srt", rank=1, steps=800, links=(1, 2, 3), n_test=200),
        "composition": dict(),
        "editing": dict(stream_lengths=(10, 50, 100)),
    },
    # seconds: every code path, meaningless numbers (the tests)
    "tiny": {
        "continual": dict(tasks=("rev", "cap"), steps=6, n_train=64, n_test=8, eval_batches=1, eval_batch_size=4,
                          fact_recall=False),
        "continual_methods": CONTINUAL_METHODS,
        "chain": dict(task="sft", rank=1, steps=6, links=(1, 2, 3), n_test=8, n_train=64),
        "composition": dict(tasks=("rev", "cap"), source_steps=6, mole_steps=4, n_train=64, n_test=8,
                            eval_batches=1, eval_batch_size=4, fact_recall=False),
        "editing": dict(stream_lengths=(2, 4), n_iter=2, n_locality_entities=4, n_calib_entities=3,
                        n_text_windows=4),
    },
}


def suite_configs(size: str) -> dict:
    """The configs of one size: {"continual": ContinualConfig, "continual_methods": [...], "chain": dict,
    "composition": CompositionConfig, "editing": EditingConfig}."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    s = SIZES[size]
    chain = {"n_train": 2000, "batch_size": 16, "lr": 4e-3, **s["chain"]}
    return {"continual": ContinualConfig(**s["continual"]), "continual_methods": list(s["continual_methods"]),
            "chain": chain, "composition": CompositionConfig(**s["composition"]),
            "editing": EditingConfig(**s["editing"])}


# ---- SLIM's routing diagnostic -------------------------------------------------------------------------

def slim_routing_shares(method, tasks, n_lines: int = 32, n_windows: int = 8) -> dict:
    """Where SLIM routes (methods.md §2.4): per adapted layer, the mean routing weight on identity experts
    and the mean sliding-cluster distance d, on in-domain inputs (the test lines of every task) and on
    general text (held-out pydoc windows). SLIM's bet: general text goes to the identity experts."""
    from ..data import PretrainData
    from ..tasks import encode_examples

    lines = [ex for t in tasks for ex in t.examples("test")[:n_lines]]
    x_task = encode_examples(lines, max(t.seq_len for t in tasks))[0]
    block = method.model.config.block_size
    x_text = PretrainData(block_size=block, seed=0).val_batches(n_windows, 1)[0][0]
    inputs = {}
    for label, x in (("in-domain (task lines)", x_task), ("general (pydoc text)", x_text)):
        stats = method.routing_stats(x)
        inputs[label] = {"identity_mass": [float(np.mean(s["identity_mass"])) for s in stats.values()],
                         "d": [float(np.mean(s["d"])) for s in stats.values()]}
    return {"method": method.name, "layers": list(stats), "inputs": inputs}


def _routing_mean(diagnostics: list[dict]) -> dict:
    """The seed mean of several slim_routing_shares results (same layers)."""
    out = {"method": diagnostics[0]["method"], "layers": diagnostics[0]["layers"], "n_seeds": len(diagnostics),
           "inputs": {}}
    for label in diagnostics[0]["inputs"]:
        out["inputs"][label] = {k: np.mean([d["inputs"][label][k] for d in diagnostics], axis=0).tolist()
                                for k in ("identity_mass", "d")}
    return out


# ---- COLA's single-task study ----------------------------------------------------------------------------

def run_chain_study(chain: dict, base_model, seeds: list[int], progress: bool = True) -> dict:
    """COLA with m = 1, 2, 3 links on one task at one small rank and one step budget (m = 1 is plain LoRA):
    exact match on the test split and the final training loss (mean of the last tenth of steps)."""
    from ..tasks import make_tasks

    config = ContinualConfig(tasks=(chain["task"],), steps=chain["steps"], batch_size=chain["batch_size"],
                             lr=chain["lr"], rank=chain["rank"], lora_alpha=2.0 * chain["rank"],
                             n_train=chain["n_train"], n_test=chain["n_test"], eval_batches=1,
                             eval_batch_size=4, fact_recall=False)
    rows = {}
    for m in chain["links"]:
        runs = []
        for seed in seeds:
            tasks = make_tasks(config.tasks, seed, config.n_train, config.n_test)
            method = build_method("cola", config, {"chain_len": m})
            r = run_continual(method, tasks, config, base_model, seed, progress=progress)
            runs.append({"seed": seed, "acc": r["acc"], "final_loss": r["train_log"][0]["final_loss"],
                         "wall_s": r["wall_s"]})
        rows[str(m)] = {"runs": runs, **{k: metrics.mean_std([r[k] for r in runs]) for k in ("acc", "final_loss")}}
    return {"config": _jsonable(chain), "seeds": list(seeds), "rows": rows}


# ---- the suite -------------------------------------------------------------------------------------------

def _seed_mean(values: list[dict]) -> dict:
    """{key: [mean, std]} over a list of {key: number} dicts (the keys of the first)."""
    return {k: metrics.mean_std([v[k] for v in values]) for k in values[0]}


def _composition_summary(runs: list[dict]) -> dict:
    out = {}
    for name in runs[0]["methods"]:
        rs = [r["methods"][name] for r in runs]
        out[name] = {"mean_acc": metrics.mean_std([r["mean_acc"] for r in rs]),
                     "per_task": _seed_mean([r["per_task"] for r in rs]),
                     "general": _seed_mean([r["general"] for r in rs])}
        if "gates" in rs[0]:
            out[name]["gate_entropy_of_mean"] = metrics.mean_std([r["gates"]["entropy_of_mean"] for r in rs])
            out[name]["gate_max_share"] = metrics.mean_std([r["gates"]["max_share"] for r in rs])
    out["singles"] = {t: {"own_acc": metrics.mean_std([r["singles"][t]["own_acc"] for r in runs])}
                      for t in runs[0]["singles"]}
    return out


def editing_headline(doc: dict, name: str, T) -> dict:
    """The reported metrics of one editing method after T edits (ELDER: at its calibrated θ)."""
    c = doc["results"][name]["by_T"][str(T)]
    return c["calibrated"] if "calibrated" in c else c


def _editing_summary(runs: list[dict]) -> dict:
    k = runs[0]["config"]["first_k"]
    keys = ("reliability", "generality", "locality", f"first{k}_reliability", "leak")
    out = {}
    for name in runs[0]["results"]:
        out[name] = {}
        for T in runs[0]["results"][name]["by_T"]:
            ms = [editing_headline(r, name, T) for r in runs]
            out[name][T] = {key: metrics.mean_std([m[key] for m in ms]) for key in keys if key in ms[0]}
    return out


def run_suite(base_model, size: str = "quick", seeds=(0,), scenarios=SCENARIOS, progress: bool = True,
              log=print, methods: list[str] | None = None) -> dict:
    """Every scenario in `scenarios` for every seed; the report's data (see the module docstring).
    `methods` replaces scenario A's method list."""
    from ..adapters import SLIM_ABLATIONS

    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown or not scenarios:
        raise ValueError(f"unknown scenario(s) {unknown}; choose from {SCENARIOS}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty; give at least one seed")
    configs = suite_configs(size)
    continual_methods = list(methods) if methods else configs["continual_methods"]
    for name in continual_methods:  # fail on a bad name before any training
        build_method(name, configs["continual"])
    t_suite = time.perf_counter()
    doc = {"size": size, "seeds": seeds, "scenarios": list(scenarios), "timings": {}}

    def stage(name, fn):
        log(f"\n== {name} (seeds {', '.join(map(str, seeds))}) ==")
        t0 = time.perf_counter()
        doc[name] = fn()
        doc["timings"][name] = time.perf_counter() - t0
        log(f"== {name}: {doc['timings'][name]:.0f} s ==")

    if "continual" in scenarios:
        slim_like = [m for m in continual_methods if m == "slim" or m in SLIM_ABLATIONS and m != "moe_lora"]
        diagnose = {m: slim_routing_shares for m in slim_like}
        stage("continual", lambda: run_methods(continual_methods, configs["continual"], seeds, base_model,
                                               progress=progress, diagnose=diagnose))
        routing = {m: _routing_mean([r["diagnostics"] for r in doc["continual"]["results"][m]]) for m in slim_like}
        doc["slim_routing"] = routing
    if "chain" in scenarios:
        stage("chain", lambda: run_chain_study(configs["chain"], base_model, seeds, progress))
    if "composition" in scenarios:
        def composition():
            runs = [run_composition(configs["composition"], base_model, seed, progress) for seed in seeds]
            return {"config": configs["composition"].to_dict(), "runs": runs, "summary": _composition_summary(runs)}
        stage("composition", composition)
    if "editing" in scenarios:
        def editing():
            runs = [run_editing(configs["editing"], base_model, seed, progress) for seed in seeds]
            return {"config": configs["editing"].to_dict(), "runs": runs, "summary": _editing_summary(runs)}
        stage("editing", editing)
    doc["timings"]["total"] = time.perf_counter() - t_suite
    return _jsonable(doc)
