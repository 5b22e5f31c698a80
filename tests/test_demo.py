"""The main job: `demo` and `run all` at the tiny size write a complete report (the numbers of the tiny
size mean nothing; the test checks the files, their contents and the run-directory rules)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tinyslim.experiments.claims import CLAIM_VERDICTS, evaluate_claims
from tinyslim.experiments.report import new_run_dir
from tinyslim.experiments.suite import SCENARIOS, suite_configs

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


def run(*args):
    return subprocess.run([sys.executable, "-m", "tinyslim", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**__import__("os").environ, "OPENBLAS_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    out = run("demo", "--size", "tiny", "--runs-dir", str(runs), "--quiet")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "The papers' claims" in out.stdout and "finished in" in out.stdout
    return runs / "demo-tiny"


def test_demo_writes_the_report_with_every_method(demo_dir):
    doc = json.loads((demo_dir / "report.json").read_text())
    configs = suite_configs("tiny")
    assert doc["size"] == "tiny" and doc["seeds"] == [0] and doc["scenarios"] == list(SCENARIOS)
    assert list(doc["continual"]["results"]) == configs["continual_methods"]
    assert set(doc["continual"]["summary"]) == set(configs["continual_methods"])
    assert set(doc["slim_routing"]) == {"slim", "slim-no-identity", "slim-no-yielding", "slim-spec"}
    routing = doc["slim_routing"]["slim"]
    for label, stats in routing["inputs"].items():
        assert len(stats["identity_mass"]) == len(routing["layers"]) > 0
        assert all(0.0 <= v <= 1.0 for v in stats["identity_mass"]), label
    assert set(doc["chain"]["rows"]) == {"1", "2", "3"}
    assert set(doc["composition"]["runs"][0]["methods"]) == set(configs["composition"].methods)
    assert set(doc["editing"]["runs"][0]["results"]) == set(configs["editing"].methods)
    # the claims table: every paper, a verdict each, the count of seeds that held never above the seeds run
    assert {c["paper"] for c in doc["claims"]} == {"SLIM", "I-LoRA", "COLA", "MoLE", "ELDER"}
    for c in doc["claims"]:
        assert c["verdict"] in CLAIM_VERDICTS and 0 <= c["held"] <= c["n_seeds"] <= 1
        assert c["verdict"] != "not run", c  # the demo runs every scenario a claim needs
    md = (demo_dir / "report.md").read_text()
    assert "## The papers' claims in the toy world" in md and "| SLIM |" in md and "## Scenario C" in md
    assert "The numbers below mean nothing" in md  # the tiny size says so


def test_demo_draws_every_plot(demo_dir):
    pytest.importorskip("matplotlib")
    doc = json.loads((demo_dir / "report.json").read_text())
    expected = {"accuracy_matrices", "forgetting_curves", "mole_gates", "slim_routing", "editing_vs_stream_length",
                "deferral_tradeoff"}
    assert set(doc["plots"]) == expected
    md = (demo_dir / "report.md").read_text()
    for name in doc["plots"].values():
        assert (demo_dir / name).read_bytes()[:8] == PNG
        assert f"]({name})" in md
    assert not list(demo_dir.glob("*.tmp*"))  # atomic writes leave no temporary file


def test_a_second_demo_never_overwrites_the_first(demo_dir, tmp_path):
    assert new_run_dir(demo_dir.parent, None, "demo-tiny") == demo_dir.parent / "demo-tiny-2"
    with pytest.raises(FileExistsError, match="--overwrite"):
        new_run_dir(demo_dir.parent, "demo-tiny", "demo")
    assert new_run_dir(demo_dir.parent, "demo-tiny", "demo", overwrite=True) == demo_dir
    out = run("demo", "--size", "tiny", "--runs-dir", str(demo_dir.parent), "--name", "demo-tiny")
    assert out.returncode == 2 and "exists" in out.stderr


def test_run_all_gives_mean_and_std_over_seeds(tmp_path):
    out = run("run", "all", "--size", "tiny", "--seeds", "2", "--scenarios", "chain,composition,editing",
              "--runs-dir", str(tmp_path), "--quiet", "--no-plots")
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads((tmp_path / "all-tiny-seeds0-1" / "report.json").read_text())
    assert doc["seeds"] == [0, 1] and "continual" not in doc
    assert len(doc["composition"]["runs"]) == 2 and len(doc["editing"]["runs"]) == 2
    m, sd = doc["composition"]["summary"]["mole"]["mean_acc"]
    accs = [r["methods"]["mole"]["mean_acc"] for r in doc["composition"]["runs"]]
    assert m == pytest.approx(sum(accs) / 2) and sd >= 0
    by_paper = {}
    for c in doc["claims"]:
        by_paper.setdefault(c["paper"], []).append(c)
        assert c["n_seeds"] in (0, 2)
    assert all(c["verdict"] == "not run" for c in by_paper["SLIM"] + by_paper["I-LoRA"])  # scenario A not run
    assert "Scenarios B and C over seeds" in (tmp_path / "all-tiny-seeds0-1" / "report.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["run", "all", "--steps", "5"], "do not apply to `run all`"),
    (["run", "continual", "--size", "tiny"], "apply to `run all` and `demo` only"),
    (["demo", "--scenarios", "continual,bogus"], "unknown scenario"),
    (["demo", "--size", "huge"], "invalid choice"),
    (["demo", "--methods", "lora,nope"], "unknown method"),
])
def test_bad_suite_arguments_fail_before_any_training(tmp_path, args, message):
    out = run(*args, "--runs-dir", str(tmp_path))
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]


def test_claims_are_computed_from_the_numbers():
    """A planted document where each ordering is known: the verdicts follow the numbers, seed by seed."""
    def cont(acc, bwt, learned, agree, slow=None, fast=None):
        r = {"acc": acc, "bwt": bwt, "learning_acc": learned, "final_general": {"agreement": agree}}
        if slow is not None:
            r["by_learner"] = {"slow": {"bwt": slow}, "fast": {"bwt": fast}}
        return r

    seeds = [  # seed 0: every scenario-A ordering holds; seed 1: I-LoRA ties ER (a tie does not hold)
        {"lora": cont(.2, -.9, .99, .02), "er": cont(.8, -.2, .99, .03), "ilora": cont(.9, -.1, .99, .04, -.1, -.2),
         "moe_lora": cont(.2, -.9, .98, .03), "slim": cont(.3, -.5, .95, .5), "slim-no-identity": cont(.3, -.5, .95, .1),
         "slim-no-yielding": cont(.3, -.5, .95, .2)},
        {"lora": cont(.2, -.9, .99, .02), "er": cont(.8, -.2, .99, .03), "ilora": cont(.8, -.2, .99, .04, -.2, -.2),
         "moe_lora": cont(.2, -.9, .98, .03), "slim": cont(.3, -.5, .90, .5), "slim-no-identity": cont(.3, -.5, .9, .6),
         "slim-no-yielding": cont(.3, -.5, .9, .2)},
    ]
    doc = {"continual": {"seeds": [0, 1], "results": {m: [s[m] for s in seeds] for m in seeds[0]}}}
    by_claim = [(c["paper"], c["held"], c["verdict"]) for c in evaluate_claims(doc)]
    assert by_claim[:5] == [("SLIM", 1, "mixed"),  # seed 1: SLIM learned 0.90 < 0.99 − 0.05
                            ("SLIM", 1, "mixed"),  # seed 1: no-identity agrees more than SLIM
                            ("I-LoRA", 1, "mixed"), ("I-LoRA", 1, "mixed"), ("I-LoRA", 1, "mixed")]
    assert all(v == "not run" for paper, _, v in by_claim if paper in ("COLA", "MoLE", "ELDER"))
    assert len(by_claim) == 12


def test_worker_processes_give_the_same_numbers_as_one_process(tmp_path):
    """Every run is seeded by its own arguments and runs on one BLAS and one kernel thread: two workers
    reproduce the in-process suite bit for bit (the parent runs NumPy single-threaded too, as `make demo`
    sets; BLAS results change with the thread count)."""
    docs = []
    for workers in ("1", "2"):
        out = run("run", "all", "--size", "tiny", "--scenarios", "continual,chain,editing", "--methods", "lora,slim",
                  "--workers", workers, "--runs-dir", str(tmp_path), "--name", f"w{workers}", "--quiet", "--no-plots")
        assert out.returncode == 0, out.stderr[-3000:]
        docs.append(json.loads((tmp_path / f"w{workers}" / "report.json").read_text()))

    def numbers(d):  # everything but the clocks and the run's own name
        if isinstance(d, dict):
            return {k: numbers(v) for k, v in d.items()
                    if not (k.endswith("_s") or k in ("run_seconds", "timings", "workers", "name", "command", "created"))}
        return [numbers(v) for v in d] if isinstance(d, list) else d

    one, two = docs
    assert numbers(one) == numbers(two)
    assert one["continual"]["summary"]["slim"]["acc_matrix"] == two["continual"]["summary"]["slim"]["acc_matrix"]


def test_claims_of_scenarios_b_c_and_cola_follow_the_numbers():
    """Planted B, C and chain documents: each row's verdict follows its own numbers, and each row's
    toy result belongs to its claim (a swapped label once went unnoticed)."""
    def edit(rel, gen, loc, first):
        return {"reliability": rel, "generality": gen, "locality": loc, "first10_reliability": first}

    def seed(elder50, ft10, ft50, grace50):
        return {"config": {"first_k": 10}, "results": {
            "elder": {"by_T": {"10": {"calibrated": edit(1, 1, 1, 1)}, "50": {"calibrated": elder50}}},
            "ft_lora": {"by_T": {"10": ft10, "50": ft50}},
            "grace": {"by_T": {"10": edit(1, 0, 1, 1), "50": grace50}}}}

    editing = {"runs": [seed(edit(.95, .5, .97, .9), edit(.5, .1, .2, .6), edit(.4, .1, .1, .2), edit(.3, 0, 1, .3)),
                        seed(edit(.95, .1, .90, .9), edit(.5, .1, .2, .1), edit(.4, .2, .1, .2), edit(.3, 0, .9, .3))]}

    def comp(mole, nla, total, ent, ent_nobal):
        gates = lambda e: {"entropy_of_mean": e, "max_share": .5}  # noqa: E731
        return {"methods": {"mole": {"mean_acc": mole, "gates": gates(ent)}, "nla": {"mean_acc": nla},
                            "lora_sum": {"mean_acc": total}, "mole_nobal": {"mean_acc": 0, "gates": gates(ent_nobal)}}}

    composition = {"runs": [comp(.5, .2, .1, 1.0, .5), comp(.5, .2, .2, .4, .5)]}
    chain = {"config": {"task": "srt", "rank": 1, "steps": 10},
             "rows": {m: {"runs": [{"acc": a} for a in accs], "final_loss": [0.5, 0.0]}
                      for m, accs in (("1", [.1, .3]), ("2", [.2, .3]), ("3", [.2, .1]))}}
    claims = evaluate_claims({"editing": editing, "composition": composition, "chain": chain})
    rows = {c["claim"][:20]: c for c in claims if c["paper"] in ("ELDER", "MoLE", "COLA")}
    expected = {  # claim prefix: (seeds held, a word its toy result must contain)
        "reliability and localit": (1, "ELDER reliability"),    # seed 1: locality .90 < .95
        "ELDER generalises edits": (1, "generality"),           # seed 1: ELDER .1 < FT-LoRA .2
        "FT-LoRA's reliability o": (1, "first-10"),             # seed 1: .2 after 50 > .1 after 10
        "a GRACE-like codebook k": (1, "GRACE-like"),           # seed 1: GRACE locality .9 < .95
        "learned per-layer gates": (1, "nla"),                  # seed 1: NLA .2 = sum .2, a tie
        "the balance loss keeps ": (1, "entropy"),              # seed 1: .4 < .5
        "at the same training bu": (1, "m = 3"),                # seed 1: m = 2 ties m = 1
    }
    for prefix, (held, word) in expected.items():
        row = rows[prefix[:20]]
        assert (row["held"], row["n_seeds"]) == (held, 2), row
        assert word in row["toy"], row
