"""The downstream task suite of scenario A: tagged character tasks, each a prompt → answer map.

Every example is one line, ``prompt + answer + "\n"``, where the prompt is ``"<tag> <input>="``.
The default sequence (``DEFAULT_TASKS``, in this order), each learnt to >= 90% by a rank-8 LoRA
within the default budget of scenario A:

    rot abcd=bcda        rotate left by one place                   (4 letters)
    srt dba=abd          sort the letters                           (3 letters)
    rev abcd=dcba        reverse the letters                        (4 letters)
    cap abcd=ABCD        upper-case                                 (4 letters)
    sft abcd=bcde        Caesar shift by one, z → a                 (4 letters)

and three more for experiments: ``bck`` (shift back by one; 99% fresh, left out as sft's mirror),
``dup`` (abcd=aabbccdd; 78% fresh, too slow) and ``add`` (37+5=42; not calibrated here, the
prototype's ~85% at 1000 steps). Inputs have a fixed length because copying from a fixed position
is what a small LoRA learns fast; with 3–5 letters the same budget reached only ~50–70%
(docs/experiments.md, "Calibration notes"). The metric decodes with
``evaluate.greedy_answers``, so this module sits above evaluate.py and data.py, below train.py.

The tag tells the model which map to apply; a LoRA trained on one task after another tends to
apply the latest map whatever the tag says, which is the forgetting scenario A measures.

Training loss is on the answer characters and the closing newline only (``mask``). The metric is
the exact match of the greedy answer: generation runs for at most ``max_answer_len + 1`` tokens
and is cut at the first newline, so an answer must also *end* where it should.

Splits are fixed per seed: the inputs of task number i of the registry (``TASK_NAMES``) come from
``np.random.default_rng([seed, i])``, drawn without repetition, so train and test are disjoint and a
task's data does not depend on which other tasks share the sequence.

Shape legend: B batch, T time (the suite's fixed sequence length ``seq_len``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .data import PAD_ID, CharTokenizer
from .evaluate import greedy_answers

__all__ = ["TaskSpec", "TASKS", "TASK_NAMES", "DEFAULT_TASKS", "Task", "make_task", "make_tasks",
           "encode_examples", "exact_match", "accuracy", "model_answerer", "evaluate_task"]

Example = tuple[str, str]  # (prompt, answer); the line is prompt + answer + "\n"
_LOWER = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class TaskSpec:
    """One task: its tag, a sampler of inputs, and the answer function."""

    tag: str
    description: str
    sample: Callable[[np.random.Generator], str]  # one random input string
    solve: Callable[[str], str]  # input → answer
    longest: str  # an input with the longest prompt and the longest answer
    n_inputs: int  # how many distinct inputs exist (bounds n_train + n_test)

    def prompt(self, text: str) -> str:
        return f"{self.tag} {text}="

    def answer(self, prompt: str) -> str:
        """The correct answer to one of this task's prompts (the oracle)."""
        if not (prompt.startswith(self.tag + " ") and prompt.endswith("=")):
            raise ValueError(f"{prompt!r} is not a {self.tag!r} prompt; expected '{self.tag} <input>='")
        return self.solve(prompt[len(self.tag) + 1:-1])

    @property
    def max_answer_len(self) -> int:
        return len(self.solve(self.longest))

    @property
    def max_line_len(self) -> int:
        """Characters in the longest line, prompt + answer + newline."""
        return len(self.prompt(self.longest)) + self.max_answer_len + 1


def _letters(n: int):
    def sample(rng: np.random.Generator) -> str:
        return "".join(_LOWER[i] for i in rng.integers(0, 26, n))
    return sample


def _shift(k: int):
    return lambda text: "".join(_LOWER[(_LOWER.index(c) + k) % 26] for c in text)


def _add(text: str) -> str:
    a, b = text.split("+")
    return str(int(a) + int(b))


def _addends(rng: np.random.Generator) -> str:
    return f"{int(rng.integers(10, 100))}+{int(rng.integers(0, 10))}"


TASKS: dict[str, TaskSpec] = {spec.tag: spec for spec in (
    TaskSpec("rev", "reverse the letters", _letters(4), lambda s: s[::-1], "abcd", 26 ** 4),
    TaskSpec("cap", "upper-case the letters", _letters(4), str.upper, "abcd", 26 ** 4),
    TaskSpec("sft", "Caesar shift by one (z wraps to a)", _letters(4), _shift(1), "abcd", 26 ** 4),
    TaskSpec("rot", "rotate left by one place", _letters(4), lambda s: s[1:] + s[:1], "abcd", 26 ** 4),
    TaskSpec("srt", "sort the letters", _letters(3), lambda s: "".join(sorted(s)), "abc", 26 ** 3),
    # not in the default sequence: bck mirrors sft; dup (78% fresh) and add learn too slowly for the budget
    TaskSpec("bck", "Caesar shift back by one (a wraps to z)", _letters(4), _shift(-1), "abcd", 26 ** 4),
    TaskSpec("dup", "write every letter twice", _letters(4), lambda s: "".join(c + c for c in s), "abcd", 26 ** 4),
    TaskSpec("add", "2-digit + 1-digit addition", _addends, _add, "99+9", 90 * 10),
)}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)  # registry order: task i's data comes from rng [seed, i]
DEFAULT_TASKS: tuple[str, ...] = ("rot", "srt", "rev", "cap", "sft")  # the slow learners first (see ContinualConfig)


# ---- data of one task ---------------------------------------------------------------------------

def encode_examples(examples: Sequence[Example], seq_len: int, tokenizer: CharTokenizer | None = None):
    """Examples → (x, y, mask), each (B, T = seq_len): x the line's ids padded with PAD, y the
    same shifted left by one, mask 1.0 exactly where y is an answer character or the newline."""
    tokenizer = tokenizer or CharTokenizer()
    B = len(examples)
    x = np.full((B, seq_len), PAD_ID, dtype=np.int64)
    y = np.full((B, seq_len), PAD_ID, dtype=np.int64)
    mask = np.zeros((B, seq_len), dtype=np.float32)
    for b, (prompt, answer) in enumerate(examples):
        ids = tokenizer.encode(prompt + answer + "\n")
        n = len(ids) - 1  # positions that predict a next token
        if n > seq_len:
            raise ValueError(f"the line {prompt + answer!r} needs {n} positions but seq_len is {seq_len}; "
                             f"use a larger seq_len (and a model with block_size >= it)")
        x[b, :n], y[b, :n] = ids[:-1], ids[1:]
        mask[b, len(prompt) - 1:n] = 1.0  # y[t] = ids[t+1]: the answer starts at ids[len(prompt)]
    return x, y, mask


@dataclass
class Task:
    """One task's fixed splits for one seed, with the training set encoded once."""

    spec: TaskSpec
    seed: int
    train: list[Example]
    test: list[Example]
    seq_len: int

    def __post_init__(self):
        self._train_arrays = encode_examples(self.train, self.seq_len)

    name = property(lambda self: self.spec.tag)
    max_answer_len = property(lambda self: self.spec.max_answer_len)

    def batch(self, batch_size: int, rng: np.random.Generator):
        """(x, y, mask), each (B, T): batch_size training examples drawn uniformly with replacement."""
        rows = rng.integers(0, len(self.train), batch_size)
        return tuple(a[rows] for a in self._train_arrays)

    def examples(self, split: str) -> list[Example]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return self.train if split == "train" else self.test

    def __repr__(self):
        return (f"Task({self.name!r}: {self.spec.description}; {len(self.train)} train / {len(self.test)} test, "
                f"seed {self.seed}, seq_len {self.seq_len})")


def make_task(name: str, seed: int = 0, n_train: int = 2000, n_test: int = 200, seq_len: int | None = None) -> Task:
    """The task `name` with n_train + n_test distinct inputs from ``default_rng([seed, index])`` (train
    gets fewer when the task has fewer distinct inputs). seq_len: the padded length of its batches."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASK_NAMES)}")
    if not (isinstance(seed, (int, np.integer)) and seed >= 0):
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be >= 1, got {n_train} and {n_test}")
    spec = TASKS[name]
    if n_test >= spec.n_inputs:
        raise ValueError(f"task {name!r} has only {spec.n_inputs} distinct inputs, not enough for n_test = {n_test} "
                         f"and a training split; ask for fewer test examples")
    n_train = min(n_train, spec.n_inputs - n_test)  # "add" has only 900 inputs: train gets the rest
    want = n_train + n_test
    rng = np.random.default_rng([seed, TASK_NAMES.index(name)])
    seen: dict[str, None] = {}  # insertion-ordered set
    for _ in range(100 * want):
        seen.setdefault(spec.sample(rng))
        if len(seen) == want:
            break
    else:
        raise RuntimeError(f"task {name!r}: drew only {len(seen)} distinct inputs of the {want} asked for")
    inputs = list(seen)
    rows = [(spec.prompt(s), spec.solve(s)) for s in inputs]
    seq_len = seq_len or spec.max_line_len - 1
    return Task(spec, seed, train=rows[n_test:], test=rows[:n_test], seq_len=seq_len)


def make_tasks(names: Sequence[str] = DEFAULT_TASKS, seed: int = 0, n_train: int = 2000, n_test: int = 200) -> list[Task]:
    """The tasks of one sequence, padded to one common length (so that batches of different tasks,
    e.g. replayed ones, stack)."""
    names = list(names)
    if not names:
        raise ValueError("make_tasks needs at least one task name")
    if len(set(names)) != len(names):
        raise ValueError(f"task names repeat: {names}")
    for name in names:
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASK_NAMES)}")
    seq_len = max(TASKS[n].max_line_len for n in names) - 1
    return [make_task(n, seed, n_train, n_test, seq_len) for n in names]


# ---- the metric ---------------------------------------------------------------------------------

def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of predictions equal to their answers, character for character."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        raise ValueError("exact_match of no examples is undefined")
    return float(np.mean([p == a for p, a in zip(predictions, answers)]))


def accuracy(answer_fn: Callable[[list[str]], list[str]], examples: Sequence[Example]) -> float:
    """Exact-match accuracy of answer_fn (prompts → answers) on examples: the one metric code path
    that models and oracles share."""
    return exact_match(answer_fn([p for p, _ in examples]), [a for _, a in examples])


def model_answerer(model, max_answer_len: int, tokenizer: CharTokenizer | None = None):
    """prompts → the model's greedy answers, at most max_answer_len + 1 tokens each, cut at the
    first newline (prompts of equal length decode together in one batch)."""
    tokenizer = tokenizer or CharTokenizer()
    return lambda prompts: greedy_answers(model, tokenizer, list(prompts), max_answer_len + 1)


def evaluate_task(model, task: Task, split: str = "test") -> float:
    """Exact-match accuracy of the model's greedy answers on one split of a task."""
    return accuracy(model_answerer(model, task.max_answer_len), task.examples(split))
