"""The main job: `demo` and `run all` at the tiny size write a complete report (the numbers of the tiny
size mean nothing; the test checks the files, their contents and the run-directory rules)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tinyslim.experiments.claims import CLAIM_VERDICTS
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
    assert set(doc["replay"]["results"]) == {"er", "ilora"} and doc["replay"]["buffer_size"] == configs["replay_buffer"]
    assert [m for m, o in doc["replay"]["method_overrides"].items() if o["buffer_size"] == 4] == ["er", "ilora"]
    assert set(doc["chain"]["rows"]) == {"1", "2", "3"}
    assert set(doc["composition"]["runs"][0]["methods"]) == set(configs["composition"].methods)
    assert set(doc["editing"]["runs"][0]["results"]) == set(configs["editing"].methods)
    # the claims table: every paper, a verdict each; one seed gives an effect but no interval
    assert {c["paper"] for c in doc["claims"]} == {"SLIM", "I-LoRA", "COLA", "MoLE", "ELDER"}
    for c in doc["claims"]:
        assert c["verdict"] in CLAIM_VERDICTS and c["n"] == 1 and c["ci95"] is None
        assert c["verdict"] == "inconclusive", c  # the demo runs every scenario a claim needs; one seed decides nothing
    assert doc["tuning_seeds"] and not set(doc["tuning_seeds"]) & set(doc["seeds"])
    assert set(doc["method_settings"]) == set(configs["continual_methods"])
    assert len(doc["frontier"]["factors"]) == 1  # the demo runs no frontier
    md = (demo_dir / "report.md").read_text()
    assert "## The papers' claims in the toy world" in md and "| SLIM |" in md and "## Scenario C" in md
    assert "## The replay study" in md
    assert "too few for evidence" in md and "Tuning seeds:" in md
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
        assert c["n"] in (0, 2)
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
    # `run all` runs the frontier: every method at each factor of its learning rate, per seed
    factors = suite_configs("tiny")["frontier_factors"]
    assert one["frontier"]["factors"] == list(factors) and len(factors) > 1
    for m in ("lora", "slim"):
        (points,) = one["frontier"]["points"][m]  # one seed
        assert [p["lr"] for p in points] == pytest.approx([one["method_settings"][m]["lr"] * f for f in factors])
    assert one["continual"]["summary"]["slim"]["acc_matrix"] == two["continual"]["summary"]["slim"]["acc_matrix"]
