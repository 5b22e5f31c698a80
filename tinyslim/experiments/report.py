"""The report of a suite run: ``report.json`` (every number), ``report.md`` (tables, claims, plots) and
the PNG plots, written into one run directory.

    write_report(doc, out_dir)   doc from suite.run_suite (+ "claims" is added here)
    render_markdown(doc)         the text of report.md
    new_run_dir(runs_dir, name)  a run directory that belongs to no other run

Every file is written atomically (io.atomic_write_*), so an interrupted run leaves no half file.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..io import atomic_write_bytes
from .claims import evaluate_claims
from .composition import format_composition
from .continual import format_results
from .editing import format_editing
from .tuning import format_tuning

__all__ = ["write_report", "render_markdown", "new_run_dir", "format_chain", "format_replay", "format_seed_summary",
           "claims_table", "format_claims_text"]


def new_run_dir(runs_dir, name: str | None, default: str, overwrite: bool = False) -> Path:
    """runs_dir/name. A name given that exists is an error unless `overwrite`; with no name, the first of
    default, default-2, default-3, … that does not exist (a run never replaces another run's files)."""
    runs_dir = Path(runs_dir)
    if name is not None:
        path = runs_dir / name
        if path.exists() and not overwrite:
            raise FileExistsError(f"the run directory {path} exists; choose another --name, or pass --overwrite "
                                  "to replace its report")
        return path
    path, n = runs_dir / default, 1
    while path.exists():
        n += 1
        path = runs_dir / f"{default}-{n}"
    return path


def _ms(pair, scale=100.0, fmt="{:.1f}") -> str:
    m, sd = pair
    return fmt.format(m * scale) + (f" ± {fmt.format(sd * scale)}" if sd else "")


def format_chain(chain: dict) -> str:
    """COLA's single-task table: accuracy and final training loss per chain length."""
    cfg = chain["config"]
    lines = [f"COLA on {cfg['task']} alone, rank {cfg['rank']}, {cfg['steps']} steps for every chain length "
             f"(m = 1 is plain LoRA); seeds {', '.join(map(str, chain['seeds']))}",
             f"{'links m':<8} {'accuracy %':>14} {'final train loss':>18}"]
    for m, row in chain["rows"].items():
        lines.append(f"{m:<8} {_ms(row['acc']):>14} {_ms(row['final_loss'], 1.0, '{:.3f}'):>18}")
    return "\n".join(lines)


def format_replay(replay: dict) -> str:
    """The replay study: scenario A's table for ER and I-LoRA at the study's buffer size."""
    lrs = ", ".join(f"{m} {lr:g}" for m, lr in replay["lr"].items())
    return (f"{len(replay['config']['tasks'])} tasks × {replay['config']['steps']} steps, a {replay['buffer_size']}-example "
            f"buffer; learning rates from scenario A's tuning: {lrs}\n"
            + format_results(replay["summary"], list(replay["config"]["tasks"]), replay["base_general"]))


def format_seed_summary(doc: dict) -> str:
    """Scenarios B and C as mean ± std over seeds (the per-seed tables are in report.json)."""
    lines = []
    comp = doc.get("composition")
    if comp:
        s = comp["summary"]
        tasks = comp["runs"][0]["tasks"]
        lines.append(f"scenario B (composition), mean ± std over {len(comp['runs'])} seed(s): accuracy (%)")
        lines.append(f"{'model':<12}" + "".join(f"{t:>14}" for t in tasks) + f"{'mean':>14}{'agree':>14}")
        for name in comp["runs"][0]["methods"]:
            r = s[name]
            lines.append(f"{name:<12}" + "".join(f"{_ms(r['per_task'][t]):>14}" for t in tasks)
                         + f"{_ms(r['mean_acc']):>14}{_ms(r['general']['agreement']):>14}")
    edit = doc.get("editing")
    if edit:
        k = edit["runs"][0]["config"]["first_k"]
        lines.append(f"\nscenario C (editing), mean ± std over {len(edit['runs'])} seed(s) (ELDER at its calibrated θ)")
        lines.append(f"{'method':<9}{'T':>4}{'reliability':>14}{'generality':>14}{'locality':>14}"
                     f"{f'first-{k} rel.':>14}")
        for name, by_T in edit["summary"].items():
            for T, m in by_T.items():
                lines.append(f"{name:<9}{T:>4}{_ms(m['reliability'], 1, '{:.2f}'):>14}"
                             f"{_ms(m['generality'], 1, '{:.2f}'):>14}{_ms(m['locality'], 1, '{:.2f}'):>14}"
                             f"{_ms(m[f'first{k}_reliability'], 1, '{:.2f}'):>14}")
    return "\n".join(lines)


def format_effect(c: dict) -> str:
    """"+3.1 [+1.2, +5.0] points": a claim's effect with its 95% interval."""
    if c["effect"] is None:
        return "-"
    if c["ci95"] is None:
        return f"{c['effect']:+.2f} {c['unit']} (one seed: no interval)"
    digits = 3 if c["unit"] == "nats" else 1
    lo, hi = c["ci95"]
    return f"{c['effect']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}] {c['unit']}"


def claims_table(claims: list[dict]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| paper | claim (one ordering) | the paper's numbers | toy test | toy result (mean over seeds) | "
             "effect A − B [95% CI] | verdict |", "|---|---|---|---|---|---|---|"]
    for c in claims:
        verdict = f"**{c['verdict']}**" if c["verdict"] in ("supported", "contradicted") else c["verdict"]
        lines.append(f"| {c['paper']} | {esc(c['claim'])} | {esc(c['paper_numbers'])} | {esc(c['test'])} | "
                     f"{esc(c['toy'])} | {format_effect(c)} | {verdict} |")
    return "\n".join(lines)


PLOT_CAPTIONS = {
    "accuracy_matrices": "Scenario A: accuracy on every task (columns) after training through each task (rows).",
    "forgetting_curves": "Scenario A: general capability on held-out pydoc text and facts over the task sequence "
                         "(0 = the base model).",
    "slim_routing": "SLIM: share of routing weight on identity experts, on task lines vs general text.",
    "mole_gates": "Scenario B: MoLE's mean gate per adapted layer and source LoRA.",
    "editing_vs_stream_length": "Scenario C: reliability, generality and locality against the number of edits.",
    "deferral_tradeoff": "Scenario C: ELDER's deferral threshold θ trades generality for locality.",
    "frontier": "Scenario A: learned accuracy against general capability kept, one point per learning rate "
                "(seed means; the claims compare each seed's frontiers at matched learned accuracy).",
}


def format_claims_text(claims: list[dict]) -> str:
    """The claims for a terminal: one block per claim, wrapped, instead of a wide Markdown table."""
    import textwrap

    lines = []
    for c in claims:
        lines.append(f"{c['paper']:<7} {c['verdict'].upper():<13} {c['claim']}")
        for label, text in (("test", c["test"]), ("toy", c["toy"]), ("effect", format_effect(c))):
            lines += textwrap.wrap(text, 100, initial_indent=f"{'':8}{label}: ", subsequent_indent=" " * 16)
    return "\n".join(lines)


def render_markdown(doc: dict, plots: dict | None = None, terminal: bool = False) -> str:
    """report.md: how it was made, the claims, every table, the plots. terminal=True: for printing (the
    claims as wrapped text, no image links)."""
    plots = {} if terminal else (plots or {})
    seeds = doc["seeds"]
    t = doc["timings"]
    out = [f"# tinyslim report: {doc.get('name', 'run')}", "",
           f"Made by `{doc.get('command', 'python -m tinyslim demo')}` on {doc.get('created', '?')}; size "
           f"**{doc['size']}**, seed(s) {', '.join(map(str, seeds))}; base model {doc.get('base_source', '?')}; "
           f"kernel backend {doc.get('backend', '?')}" + (f"; code at commit {doc['commit']}" if doc.get("commit") else "")
           + ".", "",
           f"Time: {t.get('total (wall)', 0):.0f} s wall on {doc.get('workers', 1)} worker process(es); the runs of each "
           "scenario took " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items() if k != "total (wall)") +
           " (summed over its runs).", "",
           *[f"Re-run later, in place (`--update`): {', '.join(u['scenarios'])}, by `{u['command']}` on {u['created']} "
             f"({u['wall_s']:.0f} s wall on {u['workers']} worker process(es)"
             + (f"; code at commit {u['commit']}" if u.get("commit") else "") + ").\n" for u in doc.get("updates", [])],
           "Optimiser state (Adam) is reset at every task boundary for every method. Accuracies are exact match of "
           "the greedy answer, in %.", ""]
    out += [_seeds_paragraph(doc), ""]
    if doc.get("method_settings"):
        out += ["Scenario A's settings (learning rate, and the knobs a paper leaves open): " + "; ".join(
            f"{m}: lr {s['lr']:g}" + "".join(f", {k} {v}" for k, v in s["overrides"].items()) + f" ({s['source']})"
            for m, s in doc["method_settings"].items()) + ".", ""]
    if doc.get("size") == "tiny":
        out += ["**Size tiny: a smoke test of the code paths. The numbers below mean nothing.**", ""]
    out += ["## The papers' claims in the toy world", "",
            "Each row tests one ordering A > B from the paired per-seed differences A − B over the reported seeds: "
            "the mean effect with its 95% paired-t interval. *Supported*: the interval lies above 0; "
            "*contradicted*: below 0; *inconclusive*: it contains 0 (or one seed only). The verdicts come from the "
            "reported seeds only; a supported claim should stay supported on fresh seeds.", "",
            "```\n" + format_claims_text(doc["claims"]) + "\n```" if terminal else claims_table(doc["claims"]), ""]
    sections = [
        ("continual", "Scenario A: continual fine-tuning", lambda c: format_results(
            c["summary"], list(c["config"]["tasks"]), c["base_general"]), ("accuracy_matrices", "forgetting_curves",
                                                                            "slim_routing")),
        ("replay", "The replay study: I-LoRA against ER over more tasks", format_replay, ()),
        ("chain", "COLA: one task, a rank that underfits", format_chain, ()),
        ("composition", "Scenario B: composing frozen LoRAs", lambda c: "\n\n".join(
            format_composition(r) for r in c["runs"]), ("mole_gates",)),
        ("editing", "Scenario C: lifelong editing", lambda c: "\n\n".join(format_editing(r) for r in c["runs"]),
         ("editing_vs_stream_length", "deferral_tradeoff")),
    ]
    if doc.get("frontier") and len(doc["frontier"]["factors"]) > 1:
        sections.insert(1, ("frontier", "Scenario A: the stability–plasticity frontier", format_frontier, ("frontier",)))
    if doc.get("tuning"):
        sections.append(("tuning", "How the settings were chosen (tuning seeds only)", format_tuning, ()))
    for key, title, fmt, figures in sections:
        if not doc.get(key):
            continue
        out += [f"## {title}", "", "```", fmt(doc[key]), "```", ""]
        for fig in figures:
            if fig in plots:
                out += [f"![{PLOT_CAPTIONS[fig]}]({Path(plots[fig]).name})", "", f"*{PLOT_CAPTIONS[fig]}*", ""]
    if len(seeds) > 1 and (doc.get("composition") or doc.get("editing")):
        out += ["## Scenarios B and C over seeds", "", "```", format_seed_summary(doc), "```", ""]
    return "\n".join(out)


def _seeds_paragraph(doc: dict) -> str:
    seeds, tuning = doc["seeds"], doc.get("tuning_seeds") or []
    text = f"Reported seeds: {', '.join(map(str, seeds))}."
    if tuning:
        text += (f" Tuning seeds: {', '.join(map(str, tuning))} (every tuned setting was chosen on these, with the "
                 "same grid size for every method; see the last section).")
    else:
        text += " No tuning data for this size: every method runs the scenario's defaults."
    if doc.get("seeds_used_for_tuning"):
        text += (f" **Seeds {', '.join(map(str, doc['seeds_used_for_tuning']))} are tuning seeds: the verdicts below "
                 "are not evidence.**")
    if len(seeds) < 5:
        text += f" {len(seeds)} seed(s) are too few for evidence: `python -m tinyslim run all --seeds 5`."
    return text


def format_frontier(frontier: dict) -> str:
    """Every method's (learned, kept) point per learning rate, means over seeds."""
    lines = [f"learned = {frontier['learned']}; kept = {frontier['kept']}; mean over seeds "
             f"{', '.join(map(str, frontier['seeds']))} (points)",
             f"{'method':<18} {'lr':>8} {'learned':>8} {'kept':>6} {'ACC':>6} {'BWT':>7}"]
    for m, per_seed in frontier["points"].items():
        for i in range(len(per_seed[0])):
            pts = [seed[i] for seed in per_seed]
            mean = {k: 100 * np.mean([p[k] for p in pts]) for k in ("learned", "kept", "acc", "bwt")}
            lines.append(f"{m:<18} {pts[0]['lr']:>8.2g} {mean['learned']:8.1f} {mean['kept']:6.1f} {mean['acc']:6.1f} "
                         f"{mean['bwt']:7.1f}")
    return "\n".join(lines)


def write_report(doc: dict, out_dir, plots: bool = True, log=print) -> dict:
    """Add the claims, draw the plots, write report.json and report.md; returns {what: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc["claims"] = evaluate_claims(doc)
    written = {}
    if plots:
        try:
            from .plots import write_plots
        except ImportError as err:  # matplotlib is a runtime dependency, but say so rather than lose the report
            log(f"warning: no plots ({err}); install matplotlib")
        else:
            routing = doc.get("slim_routing") or {}
            written = {k: str(v) for k, v in write_plots(
                {"continual": doc.get("continual"),
                 "composition": doc["composition"]["runs"][0] if doc.get("composition") else None,
                 "editing": doc["editing"]["runs"][0] if doc.get("editing") else None,
                 "slim_routing": routing.get("slim"), "frontier": doc.get("frontier")}, out_dir).items()}
    doc["plots"] = {k: Path(v).name for k, v in written.items()}
    atomic_write_bytes(out_dir / "report.json", json.dumps(doc, indent=1).encode())
    atomic_write_bytes(out_dir / "report.md", render_markdown(doc, written).encode())
    return {"report.json": str(out_dir / "report.json"), "report.md": str(out_dir / "report.md"), **written}
