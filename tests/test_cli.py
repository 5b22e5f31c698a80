"""The command line: each sub-command runs at a tiny size; bad options fail clearly."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "tinyslim", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)


def test_info_reports_backends():
    out = run("info")
    assert out.returncode == 0, out.stderr
    assert "tinyslim" in out.stdout and "numpy" in out.stdout


def test_unknown_option_is_a_clear_error():
    out = run("pretrain", "--bogus")
    assert out.returncode == 2
    assert "unrecognized arguments: --bogus" in out.stderr


def test_unknown_command_lists_the_choices():
    out = run("fly")
    assert out.returncode == 2 and "invalid choice" in out.stderr and "pretrain" in out.stderr


def test_bench_needs_a_name():
    out = run("bench")
    assert out.returncode == 2 and "train-step" in out.stderr


def test_pretrain_then_sample(tmp_path):
    model = tmp_path / "m.safetensors"
    out = run("pretrain", "--steps", "4", "--batch-size", "2", "--eval-every", "2", "--n-layer", "1",
              "--n-embd", "16", "--n-head", "2", "--block-size", "32", "--out", str(model), "--quiet")
    assert out.returncode == 0, out.stderr
    assert "validation loss" in out.stdout and model.is_file()
    out = run("sample", "--checkpoint", str(model), "--prompt", "def ", "--max-new-tokens", "5", "--greedy")
    assert out.returncode == 0, out.stderr
    assert "def " in out.stdout


def test_sample_rejects_a_prompt_outside_the_vocabulary_in_one_line():
    out = run("sample", "--prompt", "h\u00e9llo \u20ac")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "outside the vocabulary" in out.stderr and "U+20AC" in out.stderr


def test_sample_from_a_missing_checkpoint_fails_clearly(tmp_path):
    out = run("sample", "--checkpoint", str(tmp_path / "none.safetensors"))
    assert out.returncode != 0 and "does not exist" in out.stderr


def test_bench_help_exits_0():
    out = run("bench", "--help")
    assert out.returncode == 0 and "train-step" in out.stdout


def test_pretrain_and_sample_options_say_their_defaults():
    for command in ("pretrain", "sample"):
        out = run(command, "--help")
        assert out.returncode == 0
        text = " ".join(out.stdout.split())
        for option in ("--steps", "--lr", "--out") if command == "pretrain" else ("--prompt", "--temperature", "--seed"):
            assert option in text
        assert text.count("(default") >= (9 if command == "pretrain" else 5), text


@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory):
    """A `run continual` checkpoint of a two-step LoRA on the shipped base (what `sample --adapter` reads)."""
    from tinyslim import load_base
    from tinyslim.experiments.continual import ContinualConfig, build_method, run_continual
    from tinyslim.tasks import make_tasks

    config = ContinualConfig(tasks=("rev",), steps=2, batch_size=2, n_train=8, n_test=2, eval_batches=1,
                             eval_batch_size=2, fact_recall=False)
    path = tmp_path_factory.mktemp("adapter") / "lora-seed0.safetensors"
    run_continual(build_method("lora", config), make_tasks(config.tasks, 0, 8, 2), config, load_base(progress=False),
                  0, progress=False, checkpoint=path)
    return path


def test_sample_from_a_fine_tuned_adapter(run_checkpoint):
    out = run("sample", "--adapter", str(run_checkpoint), "--prompt", "rev abcd=", "--max-new-tokens", "5",
              "--greedy")
    assert out.returncode == 0, out.stderr
    assert "lora after 1 of 1 tasks" in out.stdout and "rev abcd=" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["sample", "--checkpoint", "{ckpt}"], "holds a 'continual', not a GPT model"),
    (["sample", "--adapter", "{missing}"], "does not exist"),
    (["run", "continual", "--base", "{missing}"], "does not exist"),
    (["export", "--checkpoint", "{ckpt}", "--out", "{tmp}"], "not a GPT model"),
    (["run", "all", "--size", "tiny", "--scenarios", "chain", "--update", "{tmp}"], "no report.json there"),
    (["run", "editing", "--update", "{tmp}"], "apply to `run all` and `demo` only"),
])
def test_user_errors_are_one_line(run_checkpoint, tmp_path, args, message):
    fill = {"ckpt": str(run_checkpoint), "missing": str(tmp_path / "none.safetensors"), "tmp": str(tmp_path / "x")}
    out = run(*(a.format(**fill) for a in args))
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr


def test_ctrl_c_during_pretrain_is_one_line(tmp_path):
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "tinyslim", "pretrain", "--steps", "100000", "--n-layer", "1",
                             "--n-embd", "16", "--n-head", "2", "--block-size", "32", "--batch-size", "2",
                             "--eval-every", "5", "--out", str(tmp_path / "m.safetensors"), "--quiet"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal would
    assert proc.stdout.readline().startswith("step")  # training has started
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and err == "interrupted; the same command resumes from the last checkpoint\n", err
