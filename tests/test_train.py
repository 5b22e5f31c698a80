"""Pretraining at a tiny size: the loss falls, checkpoints resume to the same result."""
import numpy as np

from tinyslim.data import CharTokenizer
from tinyslim.nn import GPTConfig
from tinyslim.train import PretrainConfig, evaluate_loss, greedy_answers, next_char_accuracy, pretrain

CFG = GPTConfig(vocab_size=CharTokenizer().vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)


def _run(steps, out=None, resume=True, stop_at=None):
    config = PretrainConfig(steps=steps, batch_size=4, lr=1e-2, warmup_steps=2, eval_every=3, eval_batches=2,
                            n_entities=10, n_cities=4)
    return pretrain(CFG, config, out=out, resume=resume, progress=False, log=lambda *a: None,
                    stop_at=stop_at)


def test_pretraining_lowers_the_validation_loss():
    _, summary = _run(12)
    first, last = summary["history"][0]["val_loss"], summary["history"][-1]["val_loss"]
    assert last < first < np.log(CFG.vocab_size) + 0.5


def test_resume_gives_the_same_model_as_an_uninterrupted_run(tmp_path):
    straight, _ = _run(9)
    path = tmp_path / "state.safetensors"
    _run(9, out=path, stop_at=6)  # "interrupted" after its step-6 checkpoint
    resumed, summary = _run(9, out=path)
    assert summary["history"][-1]["step"] == 9
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert np.array_equal(a, b), k


def test_metrics_are_bounded_and_agree_with_themselves():
    model, _ = _run(3)
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, CFG.vocab_size, (2, 16)), rng.integers(0, CFG.vocab_size, (2, 16)))]
    assert 0.0 <= next_char_accuracy(model, batches) <= 1.0
    assert next_char_accuracy(model, batches, reference=model) == 1.0
    assert evaluate_loss(model, batches) > 0
    outs = greedy_answers(model, CharTokenizer(), ["ab", "cd", "efg"], 3)
    assert len(outs) == 3 and all(len(o) <= 3 for o in outs)
