"""The downstream task suite: deterministic disjoint splits, masks on exactly the answer, and one
metric code path that scores an oracle 100% and a wrong answerer 0%."""
import numpy as np
import pytest

from tinyslim.data import PAD_ID, CharTokenizer
from tinyslim.nn import GPTConfig
from tinyslim.tasks import (DEFAULT_TASKS, TASK_NAMES, TASKS, accuracy, encode_examples, evaluate_task, exact_match,
                            make_task, make_tasks)

TOK = CharTokenizer()


@pytest.mark.parametrize("tag, text, answer", [
    ("rev", "abcd", "dcba"), ("cap", "abcd", "ABCD"), ("sft", "abyz", "bcza"), ("rot", "abcd", "bcda"),
    ("srt", "dba", "abd"), ("bck", "abza", "zayz"), ("dup", "abcd", "aabbccdd"), ("add", "37+5", "42"),
    ("add", "99+9", "108"),
])
def test_each_task_computes_what_its_docstring_says(tag, text, answer):
    spec = TASKS[tag]
    assert spec.prompt(text) == f"{tag} {text}="
    assert spec.answer(spec.prompt(text)) == answer
    with pytest.raises(ValueError, match="is not a"):
        spec.answer(f"xyz {text}=")


def test_splits_are_deterministic_per_seed_and_independent_of_the_sequence():
    a, b = make_task("rev", seed=3, n_train=300, n_test=50), make_task("rev", seed=3, n_train=300, n_test=50)
    assert a.train == b.train and a.test == b.test
    assert make_task("rev", seed=4, n_train=300, n_test=50).test != a.test
    # a task's data comes from rng [seed, registry index], whatever shares the sequence
    in_suite = {t.name: t for t in make_tasks(["cap", "dup", "rev"], seed=3, n_train=300, n_test=50)}
    assert in_suite["rev"].train == a.train and in_suite["rev"].test == a.test


@pytest.mark.parametrize("tag", TASK_NAMES)
def test_train_and_test_are_disjoint_and_free_of_repeats(tag):
    task = make_task(tag, seed=0, n_train=2000, n_test=200)
    train, test = [p for p, _ in task.train], [p for p, _ in task.test]
    assert len(set(train)) == len(train) and len(set(test)) == len(test) == 200
    assert not set(train) & set(test)
    assert all(task.spec.answer(p) == a for p, a in task.train + task.test)
    if tag == "add":  # only 900 inputs exist: the training split gets what the test split leaves
        assert len(train) == 700
    else:
        assert len(train) == 2000


def test_masks_cover_exactly_the_answer_and_the_newline():
    tasks = make_tasks(TASK_NAMES, seed=1, n_train=50, n_test=10)
    seq_len = tasks[0].seq_len
    assert all(t.seq_len == seq_len for t in tasks)  # one padded length: batches of different tasks stack
    for task in tasks:
        x, y, mask = encode_examples(task.train, task.seq_len)
        assert x.shape == y.shape == mask.shape == (len(task.train), seq_len)
        assert x.dtype == y.dtype == np.int64 and mask.dtype == np.float32
        assert set(np.unique(mask)) <= {0.0, 1.0}
        for row, (prompt, answer) in enumerate(task.train):
            line = TOK.encode(prompt + answer + "\n")
            n = len(line) - 1
            assert np.array_equal(x[row, :n], line[:-1]) and np.array_equal(y[row, :n], line[1:])
            assert (x[row, n:] == PAD_ID).all() and (y[row, n:] == PAD_ID).all()
            assert TOK.decode(y[row][mask[row] == 1]) == answer + "\n"
            assert mask[row, :len(prompt) - 1].sum() == 0
        assert (mask[y == PAD_ID] == 0).all()  # targets on padding never count


def test_every_line_fits_the_models_block_size():
    block = GPTConfig().block_size
    for task in make_tasks(TASK_NAMES, seed=0, n_train=100, n_test=10):
        assert task.seq_len <= block
        assert max(len(p) + len(a) + 1 for p, a in task.train + task.test) - 1 <= task.seq_len
    with pytest.raises(ValueError, match="seq_len"):
        encode_examples([("rev abcd=", "dcba")], seq_len=5)


def test_batches_are_drawn_from_the_training_split_deterministically():
    task = make_tasks(DEFAULT_TASKS, seed=0, n_train=100, n_test=10)[0]
    x1, y1, m1 = task.batch(16, np.random.default_rng(7))
    x2, y2, m2 = task.batch(16, np.random.default_rng(7))
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2) and np.array_equal(m1, m2)
    assert x1.shape == (16, task.seq_len)
    train_lines = {p + a for p, a in task.train}
    for row in x1:
        assert TOK.decode(row).split("\n")[0] in train_lines


class ScriptedModel:
    """Stands in for a GPT in greedy decoding: emits `respond(prompt)` then PAD, whatever it is asked."""

    def __init__(self, respond):
        self.respond = respond

    def generate(self, idx, max_new_tokens, greedy=True, **_):
        rows = []
        for prompt_ids in idx:
            out = TOK.encode(self.respond(TOK.decode(prompt_ids)))[:max_new_tokens]
            rows.append(np.concatenate([prompt_ids, out, np.full(max_new_tokens - len(out), PAD_ID)]))
        return np.stack(rows).astype(np.int64)


@pytest.mark.parametrize("tag", TASK_NAMES)
def test_an_oracle_scores_100_and_wrong_answers_score_0_through_the_same_metric(tag):
    task = make_task(tag, seed=0, n_train=20, n_test=30)
    oracle = task.spec.answer
    assert accuracy(lambda prompts: [oracle(p) for p in prompts], task.test) == 1.0
    assert evaluate_task(ScriptedModel(lambda p: oracle(p) + "\n"), task) == 1.0
    # the same answers that do not stop, or that are one character off, are wrong
    assert evaluate_task(ScriptedModel(lambda p: oracle(p) + "x\n"), task) == 0.0
    assert evaluate_task(ScriptedModel(lambda p: oracle(p)[:-1] + "\n"), task) == 0.0
    assert evaluate_task(ScriptedModel(lambda p: oracle(p) + oracle(p)), task) == 0.0
    half = {p for p, _ in task.test[::2]}
    assert evaluate_task(ScriptedModel(lambda p: oracle(p) + "\n" if p in half else "?\n"), task) == 0.5


def test_bad_requests_fail_clearly():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        make_task("nope")
    with pytest.raises(ValueError, match="repeat"):
        make_tasks(["rev", "rev"])
    with pytest.raises(ValueError, match="not enough for n_test"):
        make_task("add", n_test=900)
    with pytest.raises(ValueError, match="predictions for"):
        exact_match(["a"], ["a", "b"])
