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

from ..io import atomic_write_bytes
from .claims import evaluate_claims
from .composition import format_composition
from .continual import format_results
from .editing import format_editing

__all__ = ["write_report", "render_markdown", "new_run_dir", "format_chain", "format_seed_summary",
           "format_claims_text"]


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


def _claims_table(claims: list[dict]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| paper | claim | the paper's numbers | toy test | toy result (mean over seeds) | held on seeds | verdict |",
             "|---|---|---|---|---|---|---|"]
    for c in claims:
        verdict = {"held": "**held**", "not held": "**not held**"}.get(c["verdict"], c["verdict"])
        lines.append(f"| {c['paper']} | {esc(c['claim'])} | {esc(c['paper_numbers'])} | {esc(c['test'])} | "
                     f"{esc(c['toy'])} | {c['held']}/{c['n_seeds']} | {verdict} |")
    return "\n".join(lines)


PLOT_CAPTIONS = {
    "accuracy_matrices": "Scenario A: accuracy on every task (columns) after training through each task (rows).",
    "forgetting_curves": "Scenario A: general capability on held-out pydoc text and facts over the task sequence "
                         "(0 = the base model).",
    "slim_routing": "SLIM: share of routing weight on identity experts, on task lines vs general text.",
    "mole_gates": "Scenario B: MoLE's mean gate per adapted layer and source LoRA.",
    "editing_vs_stream_length": "Scenario C: reliability, generality and locality against the number of edits.",
    "deferral_tradeoff": "Scenario C: ELDER's deferral threshold θ trades generality for locality.",
}


def format_claims_text(claims: list[dict]) -> str:
    """The claims for a terminal: one block per claim, wrapped, instead of a wide Markdown table."""
    import textwrap

    lines = []
    for c in claims:
        verdict = f"{c['verdict'].upper()} ({c['held']}/{c['n_seeds']} seeds)"
        lines.append(f"{c['paper']:<7} {verdict:<22} {c['claim']}")
        for label, text in (("test", c["test"]), ("toy", c["toy"])):
            lines += textwrap.wrap(text, 100, initial_indent=f"{'':8}{label}: ", subsequent_indent=" " * 14)
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
           f"kernel backend {doc.get('backend', '?')}.", "",
           f"Time: {t.get('total (wall)', 0):.0f} s wall on {doc.get('workers', 1)} worker process(es); the runs of each "
           "scenario took " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items() if k != "total (wall)") +
           " (summed over its runs).", "",
           "Optimiser state (Adam) is reset at every task boundary for every method. Accuracies are exact match of "
           "the greedy answer, in %. The size \"quick\" trains less than the scenarios' full settings; its numbers "
           "are indicative, and the claims need several seeds (`python -m tinyslim run all --seeds 3`).", ""]
    if doc.get("method_args"):
        out += ["Settings beyond the scenario's shared ones (the knobs the papers leave open, tuned on seed 0; "
                "`tinyslim/experiments/suite.py` records what each setting tried gave): " + "; ".join(
                    f"{m}: " + ", ".join(f"{k} = {v}" for k, v in args.items()) for m, args in doc["method_args"].items())
                + ". `slim-spec` is SLIM at docs/methods.md's defaults.", ""]
    if doc.get("size") == "tiny":
        out += ["**Size tiny: a smoke test of the code paths. The numbers below mean nothing.**", ""]
    out += ["## The papers' claims in the toy world", "",
            "A claim *holds* on a seed when the strict ordering in \"toy test\" holds on that seed; a tie does not "
            "hold.", "", "```\n" + format_claims_text(doc["claims"]) + "\n```" if terminal else
            _claims_table(doc["claims"]), ""]
    sections = [
        ("continual", "Scenario A: continual fine-tuning", lambda c: format_results(
            c["summary"], list(c["config"]["tasks"]), c["base_general"]), ("accuracy_matrices", "forgetting_curves",
                                                                            "slim_routing")),
        ("chain", "COLA: one task, a rank that underfits", format_chain, ()),
        ("composition", "Scenario B: composing frozen LoRAs", lambda c: "\n\n".join(
            format_composition(r) for r in c["runs"]), ("mole_gates",)),
        ("editing", "Scenario C: lifelong editing", lambda c: "\n\n".join(format_editing(r) for r in c["runs"]),
         ("editing_vs_stream_length", "deferral_tradeoff")),
    ]
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
                 "slim_routing": routing.get("slim")}, out_dir).items()}
    doc["plots"] = {k: Path(v).name for k, v in written.items()}
    atomic_write_bytes(out_dir / "report.json", json.dumps(doc, indent=1).encode())
    atomic_write_bytes(out_dir / "report.md", render_markdown(doc, written).encode())
    return {"report.json": str(out_dir / "report.json"), "report.md": str(out_dir / "report.md"), **written}
