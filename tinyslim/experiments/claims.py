"""Each paper's headline claim beside the toy result, as one ordering judged over the reported seeds.

``evaluate_claims(doc)`` reads a suite document (suite.run_suite) and returns one row per ordering:

    paper, claim        what the paper says, in one ordering "A > B" (a claim with two orderings is two rows)
    paper_numbers       the paper's own numbers, quoted
    test                the toy ordering, in symbols, and where it is measured
    toy                 the two sides' means over the seeds
    effect, ci95, n     the mean per-seed difference A − B with its paired-t 95% interval (stats.py), in `unit`
    verdict             supported / contradicted / inconclusive (stats.py), or "not run" (a side is missing)

Forgetting claims ("SLIM keeps more of the base") are judged at matched learned accuracy on each seed's
frontier (frontier.py): a method that learns less also forgets less, so a single operating point would
confound the two. Every other claim compares the methods at their tuned settings (tuning.py). Nothing
here is tuned to the outcome; accuracies are fractions in the document and points (%) in the text.
"""
from __future__ import annotations

import numpy as np

from .frontier import matched_difference
from .stats import paired_interval, verdict

__all__ = ["evaluate_claims", "CLAIM_VERDICTS"]

CLAIM_VERDICTS = ("supported", "contradicted", "inconclusive", "not run")


def _row(paper, claim, paper_numbers, test, toy, a, b=None, unit="points", scale=100.0) -> dict:
    """One judged row from per-seed values a and b (b None: a are the differences)."""
    interval = paired_interval(np.asarray(a, float) * scale, None if b is None else np.asarray(b, float) * scale)
    return {"paper": paper, "claim": claim, "paper_numbers": paper_numbers, "test": test, "toy": toy,
            "effect": interval["effect"], "ci95": interval["ci95"], "n": interval["n"], "diffs": interval["diffs"],
            "unit": unit, "verdict": verdict(interval)}


def _not_run(paper, claim, paper_numbers, test, why) -> dict:
    return {"paper": paper, "claim": claim, "paper_numbers": paper_numbers, "test": test, "toy": f"not run: {why}",
            "effect": None, "ci95": None, "n": 0, "diffs": [], "unit": "", "verdict": "not run"}


def _pct(x) -> str:
    return f"{100 * np.mean(x):.1f}"


# ---- scenario A -----------------------------------------------------------------------------------------

def _continual_runs(doc, names, study: str = "continual") -> list[dict] | None:
    """Per seed: {method: its result at the tuned setting} in scenario A (or the replay study); None when a
    method was not run."""
    c = doc.get(study)
    if not c or any(n not in c["results"] for n in names):
        return None
    return [{n: c["results"][n][i] for n in names} for i in range(len(c["seeds"]))]


def _frontiers(doc, name) -> list[list[tuple[float, float]]]:
    """Per seed, the method's (learned, kept) points: its frontier when the suite ran one, else its one
    operating point."""
    f = (doc.get("frontier") or {}).get("points", {}).get(name)
    if f:
        return [[(p["learned"], p["kept"]) for p in seed] for seed in f]
    return [[(r[name]["learning_acc"], r[name]["final_general"]["agreement"])] for r in _continual_runs(doc, [name])]


SLIM_PAPER = ("general ability (MMLU/GSM8K/PIQA avg) after fine-tuning: SLIM 75.65, MixLoRA 51.08, LoRA 31.24; "
              "downstream avg: SLIM 86.63, MixLoRA 83.06, LoRA 77.39")
SLIM_ABLATION_PAPER = "ablations: identity experts 0.96% less forgetting; weight yielding +2.59%; dynamic merging +5.54% (MMLU)"


def _slim_claims(doc) -> list[dict]:
    rows = [  # (claim, the paper's numbers, the other side, its label)
        ("SLIM loses less general capability than LoRA at the same downstream accuracy", SLIM_PAPER, "lora",
         "LoRA (rank 8)"),
        ("SLIM loses less general capability than a LoRA with as many trainable parameters", SLIM_PAPER, "lora-r35",
         "LoRA of SLIM's size (rank 35)"),
        ("SLIM loses less general capability than MoE-LoRA (MixLoRA) at the same downstream accuracy", SLIM_PAPER,
         "moe_lora", "MoE-LoRA"),
        ("removing the identity experts loses part of SLIM's advantage", SLIM_ABLATION_PAPER, "slim-no-identity",
         "SLIM without identity experts"),
        ("removing weight yielding loses part of SLIM's advantage", SLIM_ABLATION_PAPER, "slim-no-yielding",
         "SLIM without yielding"),
    ]
    n_lr = len((doc.get("frontier") or {}).get("factors", [1]))
    where = (f"on each seed's frontier over {n_lr} learning rates" if n_lr > 1
             else "at the one operating point run (no frontier: read as indicative only)")
    out = []
    for claim, numbers, other, label in rows:
        test = (f"kept(SLIM) > kept({label}) at matched learned accuracy L*, {where} (kept = top-1 agreement "
                "with the base on held-out pydoc text after the last task; L* = the highest learned accuracy both reach)")
        if _continual_runs(doc, ["slim", other]) is None:
            out.append(_not_run("SLIM", claim, numbers, test, f"scenario A without slim and {other}"))
            continue
        pairs = [matched_difference(a, b) for a, b in zip(_frontiers(doc, "slim"), _frontiers(doc, other))]
        diffs, levels = [d for d, _ in pairs], [lv for _, lv in pairs]
        toy = f"at L* = {_pct(levels)} (mean): kept SLIM − {label} = {np.mean(diffs) * 100:+.1f} points"
        out.append(_row("SLIM", claim, numbers, test, toy, diffs))
    return out


STUDY_NAMES = {"continual": "scenario A", "replay": "the replay study"}


def _ilora_claims(doc) -> list[dict]:
    """I-LoRA against ER where replay is not saturated: the replay study (more tasks than the buffer keeps) when
    it ran, else scenario A. ER against Seq-LoRA: scenario A."""
    paper = "I-LoRA"
    numbers = "beats Seq-FT, ER, EWC, GEM, … on 8 domain benchmarks 'with up to 11% performance gains'"
    study = "replay" if _continual_runs(doc, ["ilora", "er"], "replay") else "continual"
    where = (f"the replay study ({len(doc['replay']['config']['tasks'])} tasks, a {doc['replay']['buffer_size']}-example "
             "buffer)" if study == "replay" else "scenario A")
    specs = [  # (claim, test, metric, A, B, where measured)
        ("I-LoRA ends with higher accuracy than experience replay", "ACC(I-LoRA) > ACC(ER)", "acc", "ilora", "er",
         study),
        ("experience replay ends with higher accuracy than sequential LoRA", "ACC(ER) > ACC(Seq-LoRA)", "acc", "er",
         "lora", "continual"),
        ("I-LoRA forgets less than experience replay (BWT closer to 0 from below)", "BWT(I-LoRA) > BWT(ER)", "bwt",
         "ilora", "er", study),
    ]
    out = []
    for claim, test, key, a, b, at in specs:
        test += (f" in {where if at == study else 'scenario A'}, at each method's tuned setting (ACC = mean accuracy "
                 "after the last task; BWT = mean change since learned)")
        runs = _continual_runs(doc, [a, b], at)
        if runs is None:
            out.append(_not_run(paper, claim, numbers, test, f"{STUDY_NAMES[at]} without {a} and {b}"))
            continue
        va, vb = [r[a][key] for r in runs], [r[b][key] for r in runs]
        out.append(_row(paper, claim, numbers, test, f"{key.upper()} {a} {_pct(va)}, {b} {_pct(vb)}", va, vb))
    claim, test = "the slow (EMA) learner forgets less than the fast one", f"BWT(slow learner) > BWT(fast learner) in {where}"
    numbers = "(the paper evaluates the slow, EMA learner)"
    runs = _continual_runs(doc, ["ilora"], study)
    if runs is None:
        out.append(_not_run(paper, claim, numbers, test, f"{STUDY_NAMES[study]} without ilora"))
    else:
        slow = [r["ilora"]["by_learner"]["slow"]["bwt"] for r in runs]
        fast = [r["ilora"]["by_learner"]["fast"]["bwt"] for r in runs]
        out.append(_row(paper, claim, numbers, test, f"BWT slow {_pct(slow)}, fast {_pct(fast)}", slow, fast))
    return out


def _cola_claims(doc) -> list[dict]:
    paper = "COLA"
    numbers = "OPT-1.3B WSC +3.66 pts, BoolQ +1.38, RTE +1.66; Llama-2-7B RTE 82.09 → 85.70; accuracy rises with m = 1 → 2 → 3"
    chain = doc.get("chain")
    out = []
    for m in ("2", "3"):
        claim = f"a chain of {m} links beats plain LoRA (one link) at the same training budget, where the rank is a bottleneck"
        test = f"acc(m = {m}) > acc(m = 1) on one task at a small rank, the same total steps"
        if not chain or not {"1", m} <= set(chain["rows"]):
            out.append(_not_run(paper, claim, numbers, test, f"the chain study with m = 1 and {m} was not run"))
            continue
        cfg = chain["config"]
        a, b = ([r["acc"] for r in chain["rows"][k]["runs"]] for k in (m, "1"))
        toy = f"{cfg['task']}, rank {cfg['rank']}, {cfg['steps']} steps: m = {m}: {_pct(a)}, m = 1: {_pct(b)}"
        out.append(_row(paper, claim, numbers, test, toy, a, b))
    return out


# ---- scenario B -----------------------------------------------------------------------------------------

def _mole_claims(doc) -> list[dict]:
    paper = "MoLE"
    comp = doc.get("composition")
    present = set(comp["runs"][0]["methods"]) if comp else set()
    numbers = "BBH EM with 8 LoRAs: MoLE 36.6, NLA 32.7; NLI avg: MoLE 78.07, NLA 76.53"

    def acc(m):
        return [r["methods"][m]["mean_acc"] for r in comp["runs"]]

    def ent(m):
        return [r["methods"][m]["gates"]["entropy_of_mean"] for r in comp["runs"]]

    specs = [  # (claim, numbers, test, A, B, values, unit, scale)
        ("learned per-layer gates compose LoRAs better than normalised linear arithmetic", numbers,
         "mean accuracy on the union of tasks: MoLE > NLA", "mole", "nla", acc, "points", 100.0),
        ("normalised arithmetic (the average) composes better than the plain sum", numbers,
         "mean accuracy on the union of tasks: NLA > unnormalised sum", "nla", "lora_sum", acc, "points", 100.0),
        ("the balance loss keeps the gates from collapsing onto one LoRA",
         "without L_bal one LoRA took 68% of the gate mass among 3; NLI 78.07 with, 77.57 without",
         "entropy of the mean gate distribution: MoLE > MoLE without L_bal", "mole", "mole_nobal", ent, "nats", 1.0),
    ]
    out = []
    for claim, nums, test, a, b, values, unit, scale in specs:
        if not {a, b} <= present:
            out.append(_not_run(paper, claim, nums, test, f"scenario B without {a} and {b}"))
            continue
        va, vb = values(a), values(b)
        fmt = (lambda v: f"{np.mean(v) * scale:.1f}") if unit == "points" else (lambda v: f"{np.mean(v):.3f}")
        out.append(_row(paper, claim, nums, test, f"{a} {fmt(va)}, {b} {fmt(vb)} ({unit})", va, vb, unit, scale))
    return out


# ---- scenario C -----------------------------------------------------------------------------------------

def _elder_claims(doc) -> list[dict]:
    from .suite import editing_headline

    paper = "ELDER"
    numbers = ("1,000 sequential ZsRE / CounterFact edits on GPT2-XL and LLaMA2-7B: beats 8 baselines (GRACE, MELO, …), "
               "largest gain in generality (table numbers not available here)")
    runs = (doc.get("editing") or {}).get("runs") or []
    present = set(runs[0]["results"]) if runs else set()
    Ts = sorted(runs[0]["results"]["elder"]["by_T"], key=int) if "elder" in present else []
    k = runs[0]["config"]["first_k"] if runs else "k"

    def at(name, T, key):  # one method's reported metric after T edits, per seed
        return [editing_headline(r, name, T)[key] for r in runs]

    longest = lambda: Ts[-1]  # noqa: E731
    specs = [  # (claim, numbers, test, needs, () -> (A values, B values or a constant), toy label)
        ("ELDER keeps edits reliable over the stream (reliability ≥ 0.9)", numbers,
         "reliability(ELDER) − 0.9 > 0 at the longest stream (ELDER at its calibrated θ)", {"elder"},
         lambda: (at("elder", longest(), "reliability"), 0.9), "reliability ELDER"),
        ("ELDER leaves unrelated prompts unchanged (locality ≥ 0.95)", numbers,
         "locality(ELDER) − 0.95 > 0 at the longest stream", {"elder"},
         lambda: (at("elder", longest(), "locality"), 0.95), "locality ELDER"),
        ("ELDER generalises edits to other templates better than FT-LoRA", numbers,
         "generality(ELDER) > generality(FT-LoRA) at the longest stream", {"elder", "ft_lora"},
         lambda: (at("elder", longest(), "generality"), at("ft_lora", longest(), "generality")),
         "generality ELDER vs FT-LoRA"),
        ("ELDER generalises edits better than a GRACE-like codebook", numbers,
         "generality(ELDER) > generality(GRACE-like) at the longest stream", {"elder", "grace"},
         lambda: (at("elder", longest(), "generality"), at("grace", longest(), "generality")),
         "generality ELDER vs GRACE-like"),
        ("FT-LoRA's reliability on early edits decays as the stream grows (the baseline's failure)",
         "(the failure ELDER's routing and deferral exist to fix)",
         f"FT-LoRA first-{k} reliability after the shortest stream > after the longest", {"ft_lora"},
         lambda: (at("ft_lora", Ts[0], f"first{k}_reliability"), at("ft_lora", longest(), f"first{k}_reliability")),
         f"FT-LoRA first-{k} reliability shortest vs longest stream"),
        ("ELDER's routing keeps unrelated prompts unchanged where the paper's own setting of it collapses",
         "(the paper's setting: the query at the last prompt token, routers trained by the guided loss)",
         "locality(ELDER) > locality(ELDER at the paper's setting) at the longest stream", {"elder", "elder_paper"},
         lambda: (at("elder", longest(), "locality"), at("elder_paper", longest(), "locality")),
         "locality ELDER vs the paper's setting"),
        ("a GRACE-like codebook keeps unrelated prompts unchanged better than FT-LoRA",
         "(GRACE: Hartvigsen et al., arXiv 2211.11031)", "locality(GRACE-like) > locality(FT-LoRA) at the longest stream",
         {"ft_lora", "grace"}, lambda: (at("grace", longest(), "locality"), at("ft_lora", longest(), "locality")),
         "locality GRACE-like vs FT-LoRA"),
    ]
    out = []
    for claim, nums, test, needs, values, label in specs:
        if not (needs | {"elder"}) <= present or (label.startswith("FT-LoRA first") and len(Ts) < 2):
            out.append(_not_run(paper, claim, nums, test, f"scenario C without {' and '.join(sorted(needs))} "
                                "(or with one stream length)"))
            continue
        a, b = values()
        if np.isscalar(b):
            toy = f"{label} {np.mean(a):.2f} (target {b})"
            out.append(_row(paper, claim, nums, test, toy, np.asarray(a) - b))
        else:
            out.append(_row(paper, claim, nums, test, f"{label}: {np.mean(a):.2f} vs {np.mean(b):.2f}", a, b))
    return out


def evaluate_claims(doc: dict) -> list[dict]:
    """Every claim row for a suite document (see the module docstring)."""
    return _slim_claims(doc) + _ilora_claims(doc) + _cola_claims(doc) + _mole_claims(doc) + _elder_claims(doc)
