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
