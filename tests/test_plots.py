"""The report's figures (tinyslim/experiments/plots.py) on small synthetic documents shaped like the
real ones (continual, composition, editing, SLIM routing): every figure is a readable PNG of a
plausible size, ``write_plots`` draws only the sections it is given, nothing half-written is left
behind, and a document missing a key raises a ValueError naming that key."""
from __future__ import annotations

import copy

import pytest

pytest.importorskip("matplotlib")
import matplotlib.image  # noqa: E402

from tinyslim.experiments import plots  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GENERAL = ("val_loss", "next_char_acc", "agreement", "fact_recall")


# ---- builders: the smallest documents with the real layout --------------------------------------

def _general(step: int) -> dict:
    return {"val_loss": 1.2 + step, "next_char_acc": 0.6 / (1 + step), "agreement": 1 / (1 + step),
            "fact_recall": 0.7 / (1 + step)}


def continual_doc(n_seeds: int = 2, tasks=("rot", "rev", "cap")) -> dict:
    """Scenario A: 'lora' (one learner) and 'ilora' (reports its 'slow' learner), n_seeds runs each."""
    T = len(tasks)
    R = [[1.0 if j == i else (0.5 if j < i else 0.0) for j in range(T)] for i in range(T)]
    results, summary = {}, {}
    for method, learners in (("lora", ["default"]), ("ilora", ["slow", "fast"])):
        results[method] = [{"method": method, "seed": s, "tasks": list(tasks), "learners": learners,
                            "reported_learner": learners[0],
                            "by_learner": {name: {"acc_matrix": R, "general": [_general(i + 1 + s) for i in range(T)]}
                                           for name in learners}}
                           for s in range(n_seeds)]
        summary[method] = {"acc": [0.67, 0.02], "bwt": [-0.5, 0.01], "acc_matrix": R,
                           **{m: [0.5, 0.1] for m in GENERAL}}
    return {"scenario": "continual", "config": {"tasks": list(tasks)}, "methods": list(results),
            "seeds": list(range(n_seeds)), "base_general": _general(0), "results": results, "summary": summary}


def composition_doc(layers=("transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"),
                    tasks=("rev", "cap", "sft")) -> dict:
    """Scenario B: a gate-less composer and one MoLE variant with per-layer and per-task mean gates."""
    K = len(tasks)
    peaked = lambda k: [0.8 if j == k else 0.2 / (K - 1) for j in range(K)]  # noqa: E731
    gates = {"layer_means": {name: [1 / K] * K for name in layers},
             "per_task_layer_means": {t: {name: peaked(k) for name in layers} for k, t in enumerate(tasks)},
             "mean_share": [1 / K] * K}
    return {"scenario": "composition", "seed": 0, "tasks": list(tasks),
            "methods": {"lora_sum": {"per_task": {t: 0.0 for t in tasks}, "mean_acc": 0.0},
                        "mole": {"per_task": {t: 0.5 for t in tasks}, "mean_acc": 0.5, "gates": gates}}}


def _edit_metrics(T: int) -> dict:
    return {"reliability": 1 / T, "generality": 0.5 / T, "first2_reliability": 0.8 / T, "locality": 0.9}


def editing_doc(stream_lengths=(2, 4)) -> dict:
    """Scenario C: ELDER (default / calibrated θ, θ sweep) and FT-LoRA, by stream length."""
    elder = {str(T): {"default_theta": 2.0, "calibrated_theta": 4, "default": _edit_metrics(T),
                      "calibrated": _edit_metrics(T), "no_deferral": _edit_metrics(T),
                      "sweep": [{"theta": th, "reliability": 0.5, "generality": 0.1 * th / T, "locality": 1 - 0.1 * th}
                                for th in (2, 4, 6)],
                      "calibration": [{"theta": th, "tpr": 1.0, "fpr": 0.5, "balanced_accuracy": 0.75}
                                      for th in (2, 4, 6)]}
             for T in stream_lengths}
    ft = {str(T): _edit_metrics(T) for T in stream_lengths}
    return {"scenario": "editing", "seed": 0, "config": {"stream_lengths": list(stream_lengths), "first_k": 2},
            "base": {"reliability": 0.03, "generality": 0.01, "first2_reliability": 0.0},
            "results": {"elder": {"by_T": elder}, "ft_lora": {"by_T": ft}}}


def slim_routing(n_layers: int = 3) -> dict:
    layers = [f"transformer.h.{i}.attn.c_attn" for i in range(n_layers)]
    return {"method": "slim", "layers": layers,
            "inputs": {"in-domain (task lines)": {"identity_mass": [0.1] * n_layers, "d": [-0.2] * n_layers},
                       "general (pydoc text)": {"identity_mass": [0.8] * n_layers, "d": [2.0] * n_layers}}}


def _assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), f"{path} is not a PNG"
    image = matplotlib.image.imread(path)
    h, w = image.shape[:2]
    assert 200 <= h <= 2500 and 200 <= w <= 2500, f"{path.name} is {w}×{h} pixels"
    assert len(data) < 300_000, f"{path.name} is {len(data)} bytes"


# ---- every figure draws -------------------------------------------------------------------------

@pytest.mark.parametrize("plot, doc", [
    (plots.plot_accuracy_matrices, continual_doc(n_seeds=1)),
    (plots.plot_accuracy_matrices, continual_doc(n_seeds=2)),
    (plots.plot_forgetting_curves, continual_doc(n_seeds=1)),
    (plots.plot_forgetting_curves, continual_doc(n_seeds=2)),
    (plots.plot_mole_gates, composition_doc()),
    (plots.plot_slim_routing, slim_routing()),
    (plots.plot_editing, editing_doc()),
    (plots.plot_deferral_tradeoff, editing_doc()),
], ids=["acc-1seed", "acc-2seeds", "forget-1seed", "forget-2seeds", "gates", "slim", "editing", "deferral"])
def test_each_plot_writes_a_png(tmp_path, plot, doc):
    path = plot(doc, tmp_path / "fig.png")
    assert path == tmp_path / "fig.png"
    _assert_png(path)
    assert [p.name for p in tmp_path.iterdir()] == ["fig.png"], "a temporary file was left behind"


def test_slim_routing_without_d_draws_one_panel(tmp_path):
    doc = slim_routing()
    for v in doc["inputs"].values():
        del v["d"]
    _assert_png(plots.plot_slim_routing(doc, tmp_path / "slim.png"))


def test_write_plots_draws_only_the_sections_given(tmp_path):
    written = plots.write_plots({"continual": continual_doc(1), "composition": None, "editing": editing_doc(),
                                 "slim_routing": None}, tmp_path)
    expected = {"accuracy_matrices", "forgetting_curves", "editing_vs_stream_length", "deferral_tradeoff"}
    assert set(written) == expected
    assert {p.name for p in tmp_path.iterdir()} == {plots.FILE_NAMES[name] for name in expected}
    for path in written.values():
        _assert_png(path)


def test_write_plots_skips_figures_without_data(tmp_path):
    comp = composition_doc()
    del comp["methods"]["mole"]["gates"]  # no MoLE gates: no gate figure, and no error
    edit = editing_doc()
    del edit["results"]["elder"]  # no θ sweep: editing curves only
    written = plots.write_plots({"composition": comp, "editing": edit, "slim_routing": slim_routing()}, tmp_path)
    assert set(written) == {"editing_vs_stream_length", "slim_routing"}


def test_write_plots_rejects_an_unknown_section(tmp_path):
    with pytest.raises(ValueError, match="continuel"):
        plots.write_plots({"continuel": continual_doc(1)}, tmp_path)


# ---- bad input: a ValueError naming what is missing ---------------------------------------------

def _without(doc, *keys):
    doc = copy.deepcopy(doc)
    node = doc
    for key in keys[:-1]:
        node = node[key]
    del node[keys[-1]]
    return doc


@pytest.mark.parametrize("plot, doc, missing", [
    (plots.plot_accuracy_matrices, _without(continual_doc(1), "summary", "lora", "acc_matrix"), "acc_matrix"),
    (plots.plot_accuracy_matrices, _without(continual_doc(1), "config", "tasks"), "tasks"),
    (plots.plot_forgetting_curves, _without(continual_doc(1), "base_general"), "base_general"),
    (plots.plot_forgetting_curves, _without(continual_doc(1), "results", "ilora", 0, "reported_learner"),
     "reported_learner"),
    (plots.plot_mole_gates, _without(composition_doc(), "tasks"), "tasks"),
    (plots.plot_mole_gates, _without(composition_doc(), "methods", "mole", "gates", "layer_means"), "layer_means"),
    (plots.plot_slim_routing, _without(slim_routing(), "inputs", "general (pydoc text)", "identity_mass"),
     "identity_mass"),
    (plots.plot_editing, _without(editing_doc(), "results", "ft_lora", "by_T"), "by_T"),
    (plots.plot_deferral_tradeoff, _without(editing_doc(), "results"), "results"),
])
def test_a_missing_key_is_named(tmp_path, plot, doc, missing):
    with pytest.raises(ValueError, match=missing):
        plot(doc, tmp_path / "fig.png")
    assert not any(tmp_path.iterdir()), "a failed plot left a file behind"


@pytest.mark.parametrize("plot, doc, words", [
    (plots.plot_accuracy_matrices, {"config": {"tasks": ["a"]}, "summary": {}}, "empty"),
    (plots.plot_editing, {"results": {"elder": {"by_T": {}}}}, "empty"),
    (plots.plot_slim_routing, {"layers": ["a", "b"], "inputs": {"x": {"identity_mass": [0.5]}}}, "expected 2"),
    (plots.plot_mole_gates, _without(composition_doc(), "methods", "mole", "gates"), "no method"),
    (plots.plot_deferral_tradeoff, _without(editing_doc(), "results", "elder"), "no method"),
])
def test_empty_or_mismatched_data_is_a_clear_error(tmp_path, plot, doc, words):
    with pytest.raises(ValueError, match=words):
        plot(doc, tmp_path / "fig.png")


def test_a_wrongly_shaped_accuracy_matrix_is_named(tmp_path):
    doc = continual_doc(1)
    doc["summary"]["lora"]["acc_matrix"] = [[1.0, 0.0], [0.0, 1.0]]  # 2 × 2 for 3 tasks
    with pytest.raises(ValueError, match=r"acc_matrix.*\(3, 3\)"):
        plots.plot_accuracy_matrices(doc, tmp_path / "fig.png")


def _frontier_doc(factors=(0.5, 1.0, 2.0), seeds=2):
    def point(m, f, s):
        return {"lr": 4e-3 * f, "learned": min(1.0, 0.5 + 0.2 * f + 0.01 * s), "kept": 0.3 / f + 0.05 * m, "acc": 0.3,
                "bwt": -0.9}
    return {"factors": list(factors), "points": {name: [[point(m, f, s) for f in factors] for s in range(seeds)]
                                                 for m, name in enumerate(("lora", "slim", "lora-r35"))}}


def test_frontier_plot_draws_every_method(tmp_path):
    path = plots.plot_frontier(_frontier_doc(), tmp_path / "frontier.png")
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500
    written = plots.write_plots({"frontier": _frontier_doc()}, tmp_path / "w")
    assert set(written) == {"frontier"}
    # a frontier of one learning rate is no frontier: nothing is drawn
    assert plots.write_plots({"frontier": _frontier_doc(factors=(1.0,))}, tmp_path / "one") == {}
    with pytest.raises(ValueError, match="points"):
        plots.plot_frontier({"factors": [1.0, 2.0], "points": {}}, tmp_path / "empty.png")
