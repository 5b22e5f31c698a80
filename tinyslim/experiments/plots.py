"""The demo report's figures: one PNG per question, drawn from the scenario documents.

    plot_accuracy_matrices   scenario A  R[i][j] per method: what each method still knows after each task
    plot_forgetting_curves   scenario A  general capability (pydoc loss, next-char, agreement, facts) per task
    plot_mole_gates          scenario B  MoLE's mean gate per layer and source LoRA, overall and per task
    plot_slim_routing        SLIM        routing weight on identity vs LoRA experts, in-domain vs general text
    plot_editing             scenario C  reliability / generality / locality against the number of edits T
    plot_deferral_tradeoff   scenario C  ELDER's θ sweep: generality against locality, per T
    write_plots              every figure whose data is in the report, under fixed file names

Documents are the JSON written by ``run_continual`` (seeds aggregated in ``summary``), and one
seed's ``run_composition`` / ``run_editing`` documents. Fractions are drawn as percentages.

Figures are ``matplotlib.figure.Figure`` objects rather than pyplot's: no global figure list to leak
into and no backend to switch (a PNG is always drawn by Agg), so the report can run inside a
notebook or a long process. matplotlib is imported at the top of this module, which only the report
imports: a missing matplotlib is an ImportError there, and ``import tinyslim`` never needs it. Each
PNG is written atomically (``io.atomic_write_bytes``) with 256 colours (a third of the size, no
visible change). A document missing what a figure needs raises a ValueError naming the missing key,
never a bare KeyError.
"""
from __future__ import annotations

import io
import math
import re
import textwrap
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from PIL import Image  # Pillow comes with matplotlib

from ..data import VOCAB
from ..io import atomic_write_bytes

__all__ = ["plot_accuracy_matrices", "plot_forgetting_curves", "plot_mole_gates", "plot_slim_routing",
           "plot_editing", "plot_deferral_tradeoff", "plot_frontier", "write_plots", "FILE_NAMES"]

DPI = 110
CMAP = "viridis"  # dark = low, in every heatmap
UNIFORM_NATS = math.log(len(VOCAB))  # loss of a uniform guess over the 97 characters: 4.57 nats/char

FILE_NAMES = {"accuracy_matrices": "accuracy_matrices.png", "forgetting_curves": "forgetting_curves.png",
              "mole_gates": "mole_gates.png", "slim_routing": "slim_routing.png",
              "editing_vs_stream_length": "editing_vs_stream_length.png",
              "deferral_tradeoff": "deferral_tradeoff.png", "frontier": "frontier.png"}


# ---- shared pieces --------------------------------------------------------------------------------

def _get(node, *keys, where: str):
    """node[k0][k1]…, or a ValueError naming the missing key, where it was looked for and what is there."""
    for key in keys:
        if not isinstance(node, dict):
            raise ValueError(f"{where} should be a dict holding {key!r}, but it is a {type(node).__name__}")
        if key not in node:
            have = ", ".join(repr(k) for k in list(node)[:12]) or "nothing"
            raise ValueError(f"{where} has no key {key!r} (it has {have}); pass the document the scenario wrote")
        node, where = node[key], f"{where}[{key!r}]"
    return node


def _nonempty(value, where: str, expected: str):
    if not value:
        raise ValueError(f"{where} is empty ({value!r}); expected {expected}")
    return value


def _vector(value, n: int, where: str, each: str) -> np.ndarray:
    """A list of n numbers as a float array, or a ValueError saying which length was expected."""
    v = np.asarray(value, dtype=np.float64)
    if v.shape != (n,):
        raise ValueError(f"{where} has shape {v.shape}; expected {n} numbers, one per {each}")
    return v


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig, path) -> Path:
    """Render to PNG in memory, then replace the file in one step (readers never see half a PNG)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    # 256 colours without dithering: the same picture at a third of the size (anti-aliased labels on
    # coloured cells otherwise make tens of thousands of distinct colours)
    image = Image.open(buf).convert("RGB").quantize(colors=256, dither=Image.Dither.NONE)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _suptitle(fig, text: str) -> None:
    """The figure's title, wrapped to its width (≈ 13 characters per inch at 10 pt)."""
    fig.suptitle(textwrap.fill(text, width=int(13 * fig.get_figwidth())), fontsize=10)


def _heatmap(ax, M: np.ndarray, vmax: float, fmt: str, fontsize: float):
    """imshow of M on [0, vmax] with every cell's value written in it (white on dark cells)."""
    im = ax.imshow(M, vmin=0, vmax=vmax, cmap=CMAP, aspect="auto", interpolation="nearest")
    for (i, j), v in np.ndenumerate(M):
        ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=fontsize,
                color="white" if v < 0.6 * vmax else "black")
    return im


def _short_layer(name: str) -> str:
    """'transformer.h.0.attn.c_attn' -> 'h0.attn.c_attn' (tick labels stay short)."""
    return re.sub(r"^(?:transformer\.)?h\.(\d+)\.", r"h\1.", name)


def _pm(pair, where: str, sign: bool = False) -> str:
    """A [mean, std] pair of fractions as points: '87.7±3.1' (a bare number is taken as std 0)."""
    v = np.atleast_1d(np.asarray(pair, dtype=np.float64))
    if v.shape not in ((1,), (2,)):
        raise ValueError(f"{where} is {pair!r}; expected [mean, std] (fractions)")
    mean, std = v[0], (v[1] if len(v) == 2 else 0.0)
    return f"{100 * mean:{'+' if sign else ''}.1f}±{100 * std:.1f}"


def _shared_legend(fig, axes) -> None:
    """One legend below every panel, each label once (the panels share their lines)."""
    handles = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=min(len(handles), 5),
               fontsize=8)


def _grid(n: int) -> tuple[int, int]:
    """Rows and columns for n panels, as square as possible, wider than tall."""
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


# ---- scenario A: continual learning ---------------------------------------------------------------

def plot_accuracy_matrices(continual_doc: dict, path) -> Path:
    """One R[i][j] heatmap (%) per method: rows = after training task i, columns = accuracy on task j."""
    tasks = list(_get(continual_doc, "config", "tasks", where="continual_doc"))
    summary = _nonempty(_get(continual_doc, "summary", where="continual_doc"), "continual_doc['summary']",
                        "one entry per method")
    T, methods = len(tasks), list(summary)
    nrows, ncols = _grid(len(methods))
    side = 0.42 * T + 1.3
    fig = _figure(ncols * side + 1.0, nrows * (side + 0.35) + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, method in zip(axes.flat, methods):
        where = f"continual_doc['summary'][{method!r}]"
        R = 100 * np.asarray(_get(summary[method], "acc_matrix", where=where), dtype=np.float64)
        if R.shape != (T, T):
            raise ValueError(f"{where}['acc_matrix'] has shape {R.shape}; expected ({T}, {T}) for the tasks {tasks}")
        im = _heatmap(ax, R, 100, "{:.0f}", fontsize=7 if T <= 6 else 6)
        ax.set_xticks(range(T), tasks, fontsize=8)
        ax.set_yticks(range(T), tasks, fontsize=8)
        ax.set_xlabel("accuracy on task", fontsize=8)
        ax.set_ylabel("after training task", fontsize=8)
        acc = _pm(_get(summary[method], "acc", where=where), f"{where}['acc']")
        bwt = _pm(_get(summary[method], "bwt", where=where), f"{where}['bwt']", sign=True)
        ax.set_title(f"{method}\nACC {acc} / BWT {bwt}", fontsize=9)
    for ax in axes.flat[len(methods):]:
        ax.set_axis_off()
    fig.colorbar(im, ax=axes, label="accuracy (%)", shrink=0.85)
    seeds = continual_doc.get("seeds")
    over = f"mean of {len(seeds)} seeds" if seeds and len(seeds) > 1 else "one seed"
    _suptitle(fig, f"Accuracy matrices R[i][j] (%): what each method still knows after each task ({over}); "
                   "ACC / BWT in points, ± std over seeds")
    return _save(fig, path)


_GENERAL = {  # measure: (axis label, factor to display units)
    "val_loss": ("pydoc val loss (nats/char)", 1.0),
    "next_char_acc": ("next-char accuracy (%)", 100.0),
    "agreement": ("top-1 agreement with base (%)", 100.0),
    "fact_recall": ("fact recall (%)", 100.0),
}


def plot_forgetting_curves(continual_doc: dict, path) -> Path:
    """General capability after 0 (the base), 1, …, T tasks: mean over seeds, ± std band."""
    tasks = list(_get(continual_doc, "config", "tasks", where="continual_doc"))
    base = _get(continual_doc, "base_general", where="continual_doc")
    results = _nonempty(_get(continual_doc, "results", where="continual_doc"), "continual_doc['results']",
                        "a list of per-seed runs per method")
    T = len(tasks)
    curves = {}  # method -> measure -> (seeds, T + 1) in display units
    for method, runs in results.items():
        _nonempty(runs, f"continual_doc['results'][{method!r}]", "a list of per-seed run dicts")
        per_seed = []
        for s, run in enumerate(runs):
            where = f"continual_doc['results'][{method!r}][{s}]"
            learner = _get(run, "reported_learner", where=where)
            general = _get(run, "by_learner", learner, "general", where=where)
            if len(general) != T:
                raise ValueError(f"{where}['by_learner'][{learner!r}]['general'] has {len(general)} entries; "
                                 f"expected one per task ({T}: {tasks})")
            per_seed.append(general)
        measures = [m for m in _GENERAL if m in per_seed[0][0]]
        curves[method] = {m: np.array([[base.get(m, np.nan)] + [_get(g, m, where=f"{method} general") for g in gen]
                                       for gen in per_seed], dtype=np.float64) * _GENERAL[m][1]
                          for m in measures}
    measures = [m for m in _GENERAL if any(m in c for c in curves.values())]
    if not measures:
        raise ValueError(f"the runs' 'general' entries hold none of {list(_GENERAL)}; nothing to plot")

    nrows, ncols = (1, len(measures)) if len(measures) < 4 else (2, 2)
    fig = _figure(4.2 * ncols, 3.0 * nrows + 0.8)
    axes = list(fig.subplots(nrows, ncols, squeeze=False, sharex=True).flat)
    x = np.arange(T + 1)
    colors = {m: f"C{i}" for i, m in enumerate(curves)}
    for ax, measure in zip(axes, measures):
        for method, c in curves.items():
            if measure not in c:
                continue
            Y = c[measure]
            mean = Y.mean(axis=0)
            ax.plot(x, mean, "o-", ms=4, color=colors[method], label=method)
            if len(Y) > 1:  # sample std, as the summary table's ± (metrics.mean_std)
                std = Y.std(axis=0, ddof=1)
                ax.fill_between(x, mean - std, mean + std, color=colors[method], alpha=0.2, lw=0)
        if measure == "val_loss":
            ax.axhline(UNIFORM_NATS, ls="--", color="gray", lw=1,
                       label=f"uniform guess (ln {len(VOCAB)} = {UNIFORM_NATS:.2f})")
            ax.set_ylim(bottom=0)
        else:
            ax.set_ylim(-3, 103)
        ax.set_ylabel(_GENERAL[measure][0], fontsize=9)
        ax.set_title(_GENERAL[measure][0].split(" (")[0], fontsize=9)
        ax.grid(alpha=0.3)
        ax.set_xticks(x, ["base"] + [f"{i}: {t}" for i, t in enumerate(tasks, start=1)], fontsize=8)
        if ax.get_subplotspec().is_last_row():
            ax.set_xlabel("tasks trained (number: name of the last one)", fontsize=8)
    _shared_legend(fig, axes)
    n_seeds = max(len(r) for r in results.values())
    _suptitle(fig, "General capability along the task sequence (x = 0: the base model); "
              + (f"mean of {n_seeds} seeds, band ±1 std" if n_seeds > 1 else "one seed"))
    return _save(fig, path)


def plot_frontier(frontier_doc: dict, path) -> Path:
    """Scenario A's stability–plasticity frontier: per method, its (learned, kept) points, one per learning
    rate (means over seeds, ±1 std crosses), joined in order of learning rate; the lowest rate is marked."""
    points = _nonempty(_get(frontier_doc, "points", where="frontier_doc"), "frontier_doc['points']",
                       "{method: per-seed lists of points}")
    fig = _figure(7.0, 5.0)
    ax = fig.subplots()
    for i, (method, per_seed) in enumerate(points.items()):
        per_seed = _nonempty(per_seed, f"frontier_doc['points'][{method!r}]", "a list of per-seed point lists")
        L = np.array([[p["learned"] for p in seed] for seed in per_seed], dtype=np.float64) * 100  # (seeds, lrs)
        K = np.array([[p["kept"] for p in seed] for seed in per_seed], dtype=np.float64) * 100
        lrs = [p["lr"] for p in per_seed[0]]
        order = np.argsort(lrs)
        x, y = L.mean(0)[order], K.mean(0)[order]
        ax.plot(x, y, marker="o", ms=5, color=f"C{i % 10}", ls="-" if i < 10 else "--", label=method)
        ax.plot(x[:1], y[:1], "o", ms=9, mfc="none", color=f"C{i % 10}")  # the lowest learning rate
        if len(per_seed) > 1:
            ax.errorbar(x, y, xerr=L.std(0, ddof=1)[order], yerr=K.std(0, ddof=1)[order], fmt="none",
                        ecolor=f"C{i % 10}", alpha=0.35, lw=1)
    ax.set_xlabel("learned: mean accuracy on each task right after training on it (%)", fontsize=9)
    ax.set_ylabel("kept: top-1 agreement with the base on pydoc text after the last task (%)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    n = len(next(iter(points.values())))
    _suptitle(fig, "Stability–plasticity frontier: up and right is better; each line runs from the lowest learning "
              f"rate (open circle) to the highest; mean of {n} seed(s)")
    return _save(fig, path)


# ---- scenario B: composition (MoLE gates) ---------------------------------------------------------

def _gate_variants(composition_doc: dict) -> list:
    """The composers that report MoLE gates."""
    methods = _get(composition_doc, "methods", where="composition_doc")
    return [name for name, r in methods.items() if isinstance(r, dict) and "gates" in r]


def _gate_matrix(means: dict, layers: list, K: int, where: str) -> np.ndarray:
    """{layer: K mean gates} as an (L, K) array in the order of layers."""
    return np.array([_vector(_get(means, name, where=where), K, f"{where}[{name!r}]",
                             "source LoRA in composition_doc['tasks']") for name in layers])


def plot_mole_gates(composition_doc: dict, path) -> Path:
    """Per MoLE variant: mean gate per (layer, source LoRA) on all inputs and on each task's inputs."""
    sources = list(_get(composition_doc, "tasks", where="composition_doc"))
    variants = _gate_variants(composition_doc)
    if not variants:
        raise ValueError(f"no method in composition_doc['methods'] ({list(composition_doc['methods'])}) has "
                         "'gates'; expected a MoLE variant such as 'mole'")
    K = len(sources)
    rows = []  # per variant: [(title, (L, K) gates, the task whose own LoRA to box or None)]
    for v in variants:
        where = f"composition_doc['methods'][{v!r}]['gates']"
        gates = composition_doc["methods"][v]["gates"]
        means = _nonempty(_get(gates, "layer_means", where=where), f"{where}['layer_means']",
                          "a dict layer name -> K gate means")
        layers = list(means)
        acc = composition_doc["methods"][v].get("per_task", {})
        mean_acc = composition_doc["methods"][v].get("mean_acc")
        title = f"{v}: all inputs" + (f"\n(mean accuracy {100 * mean_acc:.0f}%)" if mean_acc is not None else "")
        panels = [(title, _gate_matrix(means, layers, K, f"{where}['layer_means']"), None)]
        for task, d in gates.get("per_task_layer_means", {}).items():
            title = f"{v}: inputs of task {task}" + (f"\n(accuracy {100 * acc[task]:.0f}%)" if task in acc else "")
            panels.append((title, _gate_matrix(d, layers, K, f"{where}['per_task_layer_means'][{task!r}]"), task))
        rows.append((layers, panels))
    ncols = max(len(p) for _, p in rows)
    L = max(len(layers) for layers, _ in rows)
    fig = _figure(1.6 + ncols * (0.42 * K + 0.8), max(3.0, len(rows) * (0.2 * L + 1.1) + 0.5))
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for r, (layers, panels) in enumerate(rows):
        for c, ax in enumerate(axes[r]):
            if c >= len(panels):
                ax.set_axis_off()
                continue
            title, M, task = panels[c]
            im = _heatmap(ax, M, 1.0, "{:.2f}", fontsize=6)
            if task in sources:  # the LoRA trained on this task: where a good gate puts its weight
                ax.add_patch(Rectangle((sources.index(task) - 0.5, -0.5), 1, len(layers), fill=False,
                                       edgecolor="red", lw=2))
            ax.set_xticks(range(K), sources, fontsize=8)
            ax.set_yticks(range(len(layers)), [_short_layer(n) for n in layers] if c == 0 else [], fontsize=7)
            ax.set_xlabel("source LoRA", fontsize=8)
            ax.set_title(title, fontsize=8)
        axes[r][0].set_ylabel("adapted layer", fontsize=8)
    fig.colorbar(im, ax=axes, label="mean gate weight (0–1)", shrink=0.8)
    _suptitle(fig, "MoLE gates: mean weight on each source LoRA per layer (rows of a panel sum to 1); "
                   "red box = the task's own LoRA")
    return _save(fig, path)


# ---- SLIM routing ---------------------------------------------------------------------------------

def plot_slim_routing(slim_routing: dict, path) -> Path:
    """Per layer: routing weight on identity experts (%) for each input set; and the mean OOD score d."""
    layers = list(_nonempty(_get(slim_routing, "layers", where="slim_routing"), "slim_routing['layers']",
                            "the adapted layer names"))
    inputs = _nonempty(_get(slim_routing, "inputs", where="slim_routing"), "slim_routing['inputs']",
                       "a dict input-set name -> {'identity_mass': [...], 'd': [...]}")
    L, n = len(layers), len(inputs)
    mass = {k: 100 * _vector(_get(v, "identity_mass", where=f"slim_routing['inputs'][{k!r}]"), L,
                             f"slim_routing['inputs'][{k!r}]['identity_mass']", "entry of slim_routing['layers']")
            for k, v in inputs.items()}
    has_d = all("d" in v for v in inputs.values())
    d = {k: _vector(v["d"], L, f"slim_routing['inputs'][{k!r}]['d']", "entry of slim_routing['layers']")
         for k, v in inputs.items()} if has_d else {}

    fig = _figure(max(6.5, 0.55 * L + 2.5), 3.2 * (2 if has_d else 1) + 0.8)
    axes = fig.subplots(2 if has_d else 1, 1, squeeze=False, sharex=True)[:, 0]
    x, width = np.arange(L), 0.8 / n
    for i, name in enumerate(inputs):
        offset = (i - (n - 1) / 2) * width
        axes[0].bar(x + offset, mass[name], width, color=f"C{i}", label=f"{name}: mean {mass[name].mean():.0f}%")
        if has_d:
            axes[1].bar(x + offset, d[name], width, color=f"C{i}", label=name)
    axes[0].set_ylim(0, 100)
    axes[0].set_ylabel("on identity experts (%)", fontsize=9)
    lora = axes[0].secondary_yaxis("right", functions=(lambda y: 100 - y, lambda y: 100 - y))
    lora.set_ylabel("on LoRA experts (%)", fontsize=9)
    axes[0].set_title("routing weight on identity experts (= the base output); LoRA share = 100 − identity",
                      fontsize=9)
    axes[0].legend(fontsize=8, loc="upper left")
    if has_d:
        axes[1].axhline(0, color="gray", lw=0.8)
        axes[1].set_ylabel("mean OOD score d\n(σ beyond 1; ≤ 0 = in cluster)", fontsize=9)
        axes[1].set_title("distance to the nearest sliding cluster, d = max_c |x_c − μ_c| / σ_c − 1", fontsize=9)
        axes[1].legend(fontsize=8, loc="upper left")
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(x, [_short_layer(name) for name in layers], rotation=45, ha="right", fontsize=8)
    axes[-1].set_xlabel("adapted layer", fontsize=9)
    _suptitle(fig, f"{slim_routing.get('method', 'slim')}: does the router fall back to the base on general text?")
    return _save(fig, path)


# ---- scenario C: lifelong editing -----------------------------------------------------------------

def _by_T(editing_doc: dict, method: str) -> tuple[list, list]:
    """(stream lengths sorted numerically, their checkpoints) of one method."""
    where = f"editing_doc['results'][{method!r}]"
    by_T = _nonempty(_get(editing_doc, "results", method, "by_T", where="editing_doc"), f"{where}['by_T']",
                     "a dict stream length -> metrics")
    try:
        Ts = sorted(by_T, key=float)
    except ValueError:
        raise ValueError(f"{where}['by_T'] keys {list(by_T)} should be stream lengths such as '10'") from None
    return [int(float(T)) for T in Ts], [by_T[T] for T in Ts]


def _is_deferring(checkpoints: list) -> bool:
    """ELDER-style checkpoints: metrics at a default and at a calibrated θ (elder_checkpoint)."""
    return all(isinstance(c, dict) and "default" in c and "calibrated" in c for c in checkpoints)


def plot_editing(editing_doc: dict, path) -> Path:
    """Reliability, generality, locality (and first-k reliability) in % against the number of edits T."""
    results = _nonempty(_get(editing_doc, "results", where="editing_doc"), "editing_doc['results']",
                        "a dict method -> {'by_T': ...}")
    base = editing_doc.get("base", {})
    series = []  # (label, color, style kwargs, Ts, metric dicts), as format_editing reports them
    for i, method in enumerate(results):
        Ts, checkpoints = _by_T(editing_doc, method)
        if _is_deferring(checkpoints):
            series.append((f"{method} (default θ)", f"C{i}", dict(ls="-", marker="o", ms=8), Ts,
                           [c["default"] for c in checkpoints]))
            series.append((f"{method} (calibrated θ)", f"C{i}", dict(ls=":", marker="s", ms=12, mfc="none", mew=1.5),
                           Ts, [c["calibrated"] for c in checkpoints]))
        else:
            # smaller than the circles: where two methods score the same, both markers still show
            series.append((method, f"C{i}", dict(ls="-", marker="^", ms=6), Ts, checkpoints))
    first = sorted({k for *_, ms in series for m in ms for k in m if re.fullmatch(r"first\d+_reliability", k)})
    panels = [("reliability", "reliability: edit prompts"), ("generality", "generality: paraphrases"),
              ("locality", "locality: unrelated prompts unchanged")]
    panels += [(k, f"first-{k[5:-12]} reliability after the stream") for k in first[:1]]
    panels = [(k, t) for k, t in panels if any(k in m for *_, ms in series for m in ms)]
    if not panels:
        raise ValueError("editing_doc['results'][…]['by_T'] entries hold none of 'reliability', 'generality', "
                         "'locality'; expected run_editing's metrics")

    nrows, ncols = (1, len(panels)) if len(panels) < 4 else (2, 2)
    fig = _figure(4.0 * ncols, 3.0 * nrows + 0.8)
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    all_T = sorted({T for *_, Ts, _ in series for T in Ts})
    for ax, (key, title) in zip(axes, panels):
        for label, color, style, Ts, ms in series:
            ax.plot(Ts, [100 * m.get(key, np.nan) for m in ms], color=color, label=label, **style)
        if key in base:
            ax.axhline(100 * base[key], ls="--", color="gray", lw=1, label="base model (no edit)")
        if all_T[-1] >= 8 * all_T[0]:
            ax.set_xscale("log")
        ax.set_xticks(all_T, [str(T) for T in all_T])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.set_xlabel("edits in the stream, T", fontsize=9)
        ax.set_ylabel("% of prompts", fontsize=9)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    _shared_legend(fig, axes)
    _suptitle(fig, f"Lifelong editing against stream length (seed {editing_doc.get('seed', '?')}): "
                   "exact-match rates after the first T edits")
    return _save(fig, path)


def _deferring_methods(editing_doc: dict) -> list:
    """The methods with a θ sweep at every stream length (ELDER)."""
    checkpoints = {m: _by_T(editing_doc, m)[1] for m in _get(editing_doc, "results", where="editing_doc")}
    return [m for m, cs in checkpoints.items() if _is_deferring(cs) and all("sweep" in c for c in cs)]


def _theta_label(thetas: list) -> str:
    """'θ=2' / 'θ=2,4' / 'θ=2…10' for the θs that land on one point."""
    if len(thetas) >= 3 and len(set(np.diff(thetas))) == 1:
        return f"θ={thetas[0]:g}…{thetas[-1]:g}"
    return "θ=" + ",".join(f"{t:g}" for t in thetas)


def plot_deferral_tradeoff(editing_doc: dict, path) -> Path:
    """ELDER's θ sweep as generality against locality, one curve per T; FT-LoRA's point per T beside it."""
    deferring = _deferring_methods(editing_doc)
    if not deferring:
        raise ValueError(f"no method in editing_doc['results'] ({list(editing_doc['results'])}) has a θ sweep "
                         "('default', 'calibrated' and 'sweep' in every by_T entry); expected ELDER's results")
    others = [m for m in editing_doc["results"] if m not in deferring]
    all_T = sorted({T for m in editing_doc["results"] for T in _by_T(editing_doc, m)[0]})
    color = {T: f"C{i}" for i, T in enumerate(all_T)}
    styles = ["-", "--", ":", "-."]
    fig = _figure(8.6, 5.2)
    ax = fig.subplots()
    for mi, method in enumerate(deferring):
        for T, c in zip(*_by_T(editing_doc, method)):
            where = f"editing_doc['results'][{method!r}]['by_T']['{T}']['sweep']"
            sweep = _nonempty(c["sweep"], where, "one entry per θ")
            pts = np.array([[100 * _get(s, "locality", where=where), 100 * _get(s, "generality", where=where)]
                            for s in sweep])
            label = f"T = {T} edits" + (f" ({method})" if len(deferring) > 1 else "")
            ax.plot(pts[:, 0], pts[:, 1], styles[mi % 4], marker="o", ms=4, color=color[T], label=label)
            at = {}  # θs that land on the same point share one label
            for s, (x, y) in zip(sweep, pts):
                at.setdefault((round(x, 1), round(y, 1)), []).append(_get(s, "theta", where=where))
            for (x, y), thetas in at.items():
                ax.annotate(_theta_label(thetas), (x, y), xytext=(6, 5), textcoords="offset points", fontsize=7,
                            color=color[T])
            for key, marker in (("default", dict(marker="*", ms=15, mec="black", mfc=color[T])),
                                ("calibrated", dict(marker="D", ms=12, mec=color[T], mfc="none", mew=1.8))):
                w = f"editing_doc['results'][{method!r}]['by_T']['{T}']"
                loc, gen = (_get(c, key, name, where=w) for name in ("locality", "generality"))
                ax.plot([100 * loc], [100 * gen], ls="none", **marker)
    for method in others:
        for T, m in zip(*_by_T(editing_doc, method)):
            if "locality" in m and "generality" in m:
                ax.plot([100 * m["locality"]], [100 * m["generality"]], ls="none", marker="X", ms=10,
                        mfc=color[T], mec="black")
    handles, _ = ax.get_legend_handles_labels()  # + what each marker means, in neutral gray
    handles += [Line2D([], [], ls="none", marker="*", ms=12, mfc="gray", mec="black", label="default θ"),
                Line2D([], [], ls="none", marker="D", ms=9, mfc="none", mec="gray", mew=1.8, label="calibrated θ")]
    handles += [Line2D([], [], ls="none", marker="X", ms=9, mfc="gray", mec="black", label=f"{m} (one point per T)")
                for m in others]
    fig.legend(handles=handles, fontsize=8, loc="outside right upper")  # outside: never over a point
    ax.margins(x=0.15, y=0.08)  # room for the θ labels right of the last points
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_xlabel("locality: unrelated prompts unchanged from the base (%)", fontsize=9)
    ax.set_ylabel("generality: paraphrases answered with the edited city (%)", fontsize=9)
    ax.set_title(f"ELDER's deferral threshold θ: generality vs locality (seed {editing_doc.get('seed', '?')}); "
                 "ideal = top right", fontsize=10)
    return _save(fig, path)


# ---- the whole report -----------------------------------------------------------------------------

def write_plots(report: dict, out_dir) -> dict:
    """Every figure whose section of the report is present (not None); returns {short name: path}."""
    sections = ("continual", "composition", "editing", "slim_routing", "frontier")
    unknown = set(report) - set(sections)
    if unknown:
        raise ValueError(f"report has unknown sections {sorted(unknown)}; expected some of {list(sections)}")
    plots = [  # short name, section, function, whether the section holds this figure's data
        ("accuracy_matrices", "continual", plot_accuracy_matrices, None),
        ("frontier", "frontier", plot_frontier, lambda d: len(d["factors"]) > 1),
        ("forgetting_curves", "continual", plot_forgetting_curves, None),
        ("mole_gates", "composition", plot_mole_gates, _gate_variants),
        ("slim_routing", "slim_routing", plot_slim_routing, None),
        ("editing_vs_stream_length", "editing", plot_editing, None),
        ("deferral_tradeoff", "editing", plot_deferral_tradeoff, _deferring_methods),
    ]
    out_dir = Path(out_dir)
    written = {}
    for name, section, plot, has_data in plots:
        doc = report.get(section)
        if doc is None or (has_data is not None and not has_data(doc)):
            continue
        written[name] = plot(doc, out_dir / FILE_NAMES[name])
    return written
