"""Every world at one size: what ``python -m tinyslim demo`` and ``run all`` execute.

``run_suite`` runs, for each seed, on the same base model:

    continual    scenario A: every row of ``continual_methods`` (the methods, the parameter-matched
                 LoRAs, SLIM's ablations) through the task sequence, at the setting chosen on the
                 tuning seeds (tuning.py) and, with ``frontier``, at ½× and 2× its learning rate
                 (frontier.py); SLIM's routing shares measured at the end (identity vs LoRA experts
                 on task lines against pydoc text)
    replay       the replay methods (ER, I-LoRA) through a longer task sequence, where their 200-example buffer
                 no longer keeps every old task: I-LoRA against ER is only a race where ER is not saturated
                 (on scenario A's three tasks ER ends at 98% and I-LoRA has nothing to add)
    chain        COLA's claim on one task a small rank underfits: chains of m = 1, 2, 3 links at the
                 same step budget (m = 1 is plain LoRA)
    composition  scenario B: K single-task LoRAs, composed by sum, NLA and MoLE (with and without L_bal)
    editing      scenario C: an edit stream, ELDER against FT-LoRA and GRACE, metrics against stream length

and returns one JSON-able document (the report's data; report.py turns it into tables, claims and
plots). Sizes: "quick" (the demo: one seed in a few minutes on 2 cores), "full" (each scenario's own
calibrated defaults, minutes per method and seed), "tiny" (seconds; the test suite's size, whose
numbers mean nothing).
"""
from __future__ import annotations

import dataclasses
import time
import weakref

import numpy as np

from ..tasks import make_tasks
from . import metrics
from .composition import CompositionConfig, run_composition
from ..io import jsonable
from .continual import ContinualConfig, GeneralEval, build_method, methods_doc, run_continual
from .editing import EditingConfig, run_editing
from .jobs import Job, run_jobs
from .tuning import load_tuning, settings_for

__all__ = ["SIZES", "SCENARIOS", "suite_configs", "run_suite", "update_suite_doc", "slim_routing_shares",
           "editing_headline"]

SCENARIOS = ("continual", "replay", "chain", "composition", "editing")

# scenario A's rows: the methods, the parameter-matched LoRAs (lora-r34 ≈ moe_lora's 241,712 trainable
# parameters, lora-r35 ≈ SLIM's 247,880; a test checks they are the nearest ranks), SLIM's ablation rows and
# SLIM at its documented defaults. Every row's setting comes from the tuning data (tuning.py).
CONTINUAL_METHODS = ("lora", "er", "ilora", "cola", "moe_lora", "slim", "slim-no-identity", "slim-no-yielding",
                     "lora-r34", "lora-r35", "slim-spec")
# the stability–plasticity frontier: every row but these also runs at its learning rate × each factor
FRONTIER_FACTORS = (0.5, 1.0, 2.0)
FRONTIER_SKIP = ("slim-spec",)  # a fixed reference point, not a method being compared
# the replay study: the methods whose claim is about replay, at their scenario-A tuned settings, over more tasks
REPLAY_METHODS = ("er", "ilora")

SIZES = {
    # 3 tasks × 600 steps: Seq-LoRA learns each task to 98–100% and keeps 0% of it one task later
    "quick": {
        "continual": dict(tasks=("rev", "cap", "sft"), steps=600, n_test=100, eval_batches=2),
        "continual_methods": CONTINUAL_METHODS,
        # five tasks: ER learns each (99%) and ends at 81% (tuning seed 100; docs/evidence.md, "The replay study")
        "replay": dict(tasks=("rot", "srt", "rev", "cap", "sft"), steps=600, n_test=100, eval_batches=2),
        "replay_buffer": 200,
        "chain": dict(task="srt", rank=1, steps=800, links=(1, 2, 3), n_test=100),
        "composition": dict(tasks=("rev", "cap", "sft"), source_steps=600, mole_steps=600, n_test=100,
                            eval_batches=2),
        "editing": dict(stream_lengths=(10, 50)),
    },
    # each scenario's own defaults (5 tasks × 800 steps; the editing stream up to 100 edits)
    "full": {
        "continual": dict(),
        "continual_methods": CONTINUAL_METHODS,
        "replay": dict(tasks=("rot", "srt", "rev", "cap", "sft", "bck", "dup")),
        "replay_buffer": 200,
        "chain": dict(task="srt", rank=1, steps=800, links=(1, 2, 3), n_test=200),
        "composition": dict(),
        "editing": dict(stream_lengths=(10, 50, 100)),
    },
    # seconds: every code path, meaningless numbers (the tests)
    "tiny": {
        "continual": dict(tasks=("rev", "cap"), steps=6, n_train=64, n_test=8, eval_batches=1, eval_batch_size=4,
                          fact_recall=False),
        "continual_methods": CONTINUAL_METHODS,
        "frontier_factors": (0.5, 1.0),
        "replay": dict(tasks=("rev", "cap"), steps=6, n_train=64, n_test=8, eval_batches=1, eval_batch_size=4,
                       fact_recall=False),
        "replay_buffer": 4,
        "chain": dict(task="sft", rank=1, steps=6, links=(1, 2, 3), n_test=8, n_train=64),
        "composition": dict(tasks=("rev", "cap"), source_steps=6, mole_steps=4, n_train=64, n_test=8,
                            eval_batches=1, eval_batch_size=4, fact_recall=False),
        "editing": dict(stream_lengths=(2, 4), n_iter=2, n_locality_entities=4, n_calib_entities=3,
                        n_text_windows=4, n_query_windows=16),
    },
}


def suite_configs(size: str) -> dict:
    """The configs of one size: {"continual": ContinualConfig, "continual_methods": [...], "replay": ContinualConfig,
    "replay_buffer": int, "chain": dict,
    "composition": CompositionConfig, "editing": EditingConfig}."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    s = SIZES[size]
    chain = {"n_train": 2000, "batch_size": 16, "lr": 4e-3, **s["chain"]}
    return {"continual": ContinualConfig(**s["continual"]), "continual_methods": list(s["continual_methods"]),
            "replay": ContinualConfig(**s["replay"]), "replay_buffer": s["replay_buffer"],
            "frontier_factors": tuple(s.get("frontier_factors", FRONTIER_FACTORS)), "chain": chain, "composition": CompositionConfig(**s["composition"]),
            "editing": EditingConfig(**s["editing"])}


# ---- SLIM's routing diagnostic -------------------------------------------------------------------------

def slim_routing_shares(method, tasks, n_lines: int = 32, n_windows: int = 8) -> dict:
    """Where SLIM routes (docs/methods.md §2.4): per adapted layer, the mean routing weight on identity experts
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


# ---- the runs, one job each (module-level, so that worker processes can import them) ----------------------

# the base model's general-capability measurement, once per process, base model and setting (weakly keyed:
# a base model that is gone takes its measurements with it, and a new one never inherits them)
_GENERAL: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _general(base_model, config: ContinualConfig) -> GeneralEval:
    key = (config.eval_batches, config.eval_batch_size, config.fact_recall)
    per_model = _GENERAL.setdefault(base_model, {})
    if key not in per_model:
        per_model[key] = GeneralEval(base_model, config)
    return per_model[key]


def continual_job(base_model, name: str, config: ContinualConfig, seed: int, overrides: dict | None,
                  routing: bool, progress: bool, lr: float | None = None) -> dict:
    """Scenario A for one method and seed, at learning rate `lr` (None: the config's) (+ SLIM's routing
    shares when `routing`)."""
    if lr is not None:
        config = dataclasses.replace(config, lr=lr)
    tasks = make_tasks(config.tasks, seed, config.n_train, config.n_test)
    method = build_method(name, config, overrides)
    return run_continual(method, tasks, config, base_model, seed, progress, _general(base_model, config),
                         diagnose=slim_routing_shares if routing else None)


def chain_config(chain: dict) -> ContinualConfig:
    """COLA's single-task study as a one-task scenario A: the rank under test, α = 2·rank (s = 2)."""
    return ContinualConfig(tasks=(chain["task"],), steps=chain["steps"], batch_size=chain["batch_size"],
                           lr=chain["lr"], rank=chain["rank"], lora_alpha=2.0 * chain["rank"],
                           n_train=chain["n_train"], n_test=chain["n_test"], eval_batches=1,
                           eval_batch_size=4, fact_recall=False)


def chain_job(base_model, chain: dict, links: int, seed: int, progress: bool) -> dict:
    """COLA with `links` links on one task at one small rank and one step budget (m = 1 is plain LoRA):
    exact match on the test split and the final training loss (mean of the last tenth of steps)."""
    config = chain_config(chain)
    tasks = make_tasks(config.tasks, seed, config.n_train, config.n_test)
    r = run_continual(build_method("cola", config, {"chain_len": links}), tasks, config, base_model, seed, progress,
                      _general(base_model, config))
    return {"seed": seed, "acc": r["acc"], "final_loss": r["train_log"][0]["final_loss"], "wall_s": r["wall_s"]}


def composition_job(base_model, config: CompositionConfig, seed: int, progress: bool) -> dict:
    return run_composition(config, base_model, seed, progress)


def editing_job(base_model, config: EditingConfig, seed: int, progress: bool) -> dict:
    return run_editing(config, base_model, seed, progress)


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


def _continual_label(method: str, factor: float, seed: int) -> str:
    return f"continual {method} seed {seed}" if factor == 1.0 else f"continual {method} lr×{factor:g} seed {seed}"


def _point(lr: float, r: dict) -> dict:
    return {"lr": lr, "learned": r["learning_acc"], "kept": r["final_general"]["agreement"], "acc": r["acc"],
            "bwt": r["bwt"]}


def _frontier_doc(results: dict, methods: list[str], factors, seeds: list[int], lr_of: dict) -> dict:
    """Per method and seed, its (learned, kept) points, one per learning rate (frontier.py)."""
    points = {}
    for m in methods:
        fs = [f for f in factors if _continual_label(m, f, seeds[0]) in results]
        points[m] = [[_point(lr_of[m] * f, results[_continual_label(m, f, seed)]) for f in fs] for seed in seeds]
    return {"factors": list(factors), "seeds": seeds, "lr": {m: lr_of[m] for m in methods}, "points": points,
            "learned": "mean accuracy on each task right after training on it",
            "kept": "top-1 agreement with the base model on held-out pydoc text after the last task"}


def _suite_jobs(configs, scenarios, seeds, continual_methods, factors, overrides, replay_overrides, lr_of, slim_like,
                inline: bool) -> list[Job]:
    """One Job per independent run of the suite (a scenario-A row, learning rate and seed; a replay-study
    method and seed; a seed of B or C; a chain length and seed)."""
    chain = configs["chain"]
    jobs = [Job(f"composition seed {seed}", composition_job, (configs["composition"], seed, inline))
            for seed in seeds if "composition" in scenarios]
    jobs += [Job(_continual_label(m, f, seed), continual_job,
                 (m, configs["continual"], seed, overrides.get(m), m in slim_like and f == 1.0, inline, lr_of[m] * f))
             for seed in seeds for m in continual_methods for f in factors
             if "continual" in scenarios and (f == 1.0 or m not in FRONTIER_SKIP)]
    jobs += [Job(f"replay {m} seed {seed}", continual_job,
                 (m, configs["replay"], seed, replay_overrides[m], False, inline, lr_of[m]))
             for seed in seeds for m in REPLAY_METHODS if "replay" in scenarios]
    jobs += [Job(f"editing seed {seed}", editing_job, (configs["editing"], seed, inline))
             for seed in seeds if "editing" in scenarios]
    jobs += [Job(f"chain m={m} seed {seed}", chain_job, (chain, m, seed, inline))
             for seed in seeds for m in chain["links"] if "chain" in scenarios]
    return jobs


def run_suite(base_model, size: str = "quick", seeds=(0,), scenarios=SCENARIOS, progress: bool = True,
              log=print, methods: list[str] | None = None, workers: int = 1, frontier: bool = True) -> dict:
    """Every scenario in `scenarios` for every seed; the report's data (see the module docstring).
    `methods` replaces scenario A's method list. `workers` > 1 runs the independent runs (a method and
    seed of scenario A, a chain length and seed, a seed of B or C) on that many processes (jobs.py):
    the same results, about `workers` times sooner on as many cores. Scenario A's settings come from the
    committed tuning data of the size (tuning.py); with `frontier`, every row but FRONTIER_SKIP also runs at
    its learning rate × each frontier factor."""
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
    slim_like = [m for m in continual_methods if m in SLIM_ABLATIONS and m != "moe_lora"]  # SLIM and its rows
    tuning = load_tuning(size)
    settings = {m: settings_for(m, tuning) for m in dict.fromkeys(continual_methods + list(REPLAY_METHODS))}
    # (lr or None, overrides, source)
    overrides = {m: o for m, (_, o, _) in settings.items() if o}
    lr_of = {m: lr or configs["continual"].lr for m, (lr, _, _) in settings.items()}
    factors = configs["frontier_factors"] if frontier else (1.0,)
    tuned_on = sorted(set(seeds) & set(tuning["tuning_seeds"])) if tuning else []
    if tuned_on:
        log(f"warning: seed(s) {tuned_on} are tuning seeds: the settings were chosen on them, so claims judged "
            "on them are not evidence")
    inline = progress and workers == 1  # per-step progress bars only when the runs are in this process

    replay_overrides = {m: {**overrides.get(m, {}), "buffer_size": configs["replay_buffer"]} for m in REPLAY_METHODS}
    jobs = _suite_jobs(configs, scenarios, seeds, continual_methods, factors, overrides, replay_overrides, lr_of,
                       slim_like, inline)
    if workers > 1:  # the longest runs first, so that the last worker to finish is not left with a long one
        jobs.sort(key=lambda j: j.label.startswith(("composition", "continual", "replay")), reverse=True)  # stable
    log(f"{len(jobs)} runs on {min(workers, len(jobs))} worker(s)")
    t_suite = time.perf_counter()
    results, seconds, used = run_jobs(jobs, base_model, workers, log, progress)

    doc = {"size": size, "seeds": seeds, "tuning_seeds": tuning["tuning_seeds"] if tuning else [],
           "seeds_used_for_tuning": tuned_on, "scenarios": list(scenarios), "workers": used,
           "run_seconds": seconds, "timings": {}}
    for scenario in SCENARIOS:  # the seconds of each scenario's runs, summed (on one worker: its wall time)
        if scenario in scenarios:
            doc["timings"][scenario] = sum(v for k, v in seconds.items() if k.startswith(scenario))
    if "continual" in scenarios:
        doc["method_settings"] = {m: {"lr": lr_of[m], "overrides": o, "source": src}
                                  for m, (_, o, src) in settings.items() if m in continual_methods}
        doc["tuning"] = tuning
        per_method = {m: [results[_continual_label(m, 1.0, seed)] for seed in seeds] for m in continual_methods}
        doc["continual"] = methods_doc(configs["continual"], seeds, overrides, per_method)
        doc["frontier"] = _frontier_doc(results, continual_methods, factors, seeds, lr_of)
        doc["slim_routing"] = {m: _routing_mean([r["diagnostics"] for r in per_method[m]]) for m in slim_like}
    if "replay" in scenarios:
        per_method = {m: [results[f"replay {m} seed {seed}"] for seed in seeds] for m in REPLAY_METHODS}
        doc["replay"] = {**methods_doc(configs["replay"], seeds, replay_overrides, per_method),
                         "buffer_size": configs["replay_buffer"], "lr": {m: lr_of[m] for m in REPLAY_METHODS}}
    if "chain" in scenarios:
        chain, rows = configs["chain"], {}
        for m in chain["links"]:
            runs = [results[f"chain m={m} seed {seed}"] for seed in seeds]
            rows[str(m)] = {"runs": runs, **{k: metrics.mean_std([r[k] for r in runs]) for k in ("acc", "final_loss")}}
        doc["chain"] = {"config": jsonable(chain), "seeds": seeds, "rows": rows}
    if "composition" in scenarios:
        runs = [results[f"composition seed {seed}"] for seed in seeds]
        doc["composition"] = {"config": configs["composition"].to_dict(), "runs": runs,
                              "summary": _composition_summary(runs)}
    if "editing" in scenarios:
        runs = [results[f"editing seed {seed}"] for seed in seeds]
        doc["editing"] = {"config": configs["editing"].to_dict(), "runs": runs, "summary": _editing_summary(runs)}
    doc["timings"]["total (wall)"] = time.perf_counter() - t_suite
    return jsonable(doc)


# the document keys each scenario writes (run_suite), which update_suite_doc replaces together
SCENARIO_KEYS = {"continual": ("continual", "method_settings", "tuning", "frontier", "slim_routing"),
                 "replay": ("replay",), "chain": ("chain",), "composition": ("composition",), "editing": ("editing",)}


def update_suite_doc(old: dict, new: dict) -> dict:
    """`old` (a report's document) with the scenarios that `new` ran replaced by new's, at the same size and
    seeds: re-run one scenario after changing it, without re-running the others. The claims and plots are
    dropped (write_report makes them again), and ``updates`` records what was re-run, by which command."""
    for key in ("size", "seeds"):
        if old.get(key) != new.get(key):
            raise ValueError(f"cannot update a report of {key} {old.get(key)!r} with a run of {key} {new.get(key)!r}; "
                             f"run the same --size and seeds as the report")
    doc = {k: v for k, v in old.items() if k not in ("claims", "plots")}
    for scenario in new["scenarios"]:
        for key in SCENARIO_KEYS[scenario]:
            doc.pop(key, None)
            if key in new:
                doc[key] = new[key]
        doc["timings"] = {**doc["timings"], scenario: new["timings"][scenario]}
        doc["run_seconds"] = {**{k: v for k, v in doc["run_seconds"].items() if not k.startswith(scenario + " ")},
                              **{k: v for k, v in new["run_seconds"].items() if k.startswith(scenario + " ")}}
    doc["scenarios"] = [s for s in SCENARIOS if s in old["scenarios"] or s in new["scenarios"]]
    doc["updates"] = list(old.get("updates", [])) + [
        {"scenarios": new["scenarios"], "command": new.get("command"), "created": new.get("created"),
         "wall_s": new["timings"]["total (wall)"], "workers": new.get("workers"), "backend": new.get("backend"),
         "commit": new.get("commit")}]
    return doc
