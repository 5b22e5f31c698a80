"""The pretrained tiny base model every experiment and tutorial starts from: ``load_base()``."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["SHIPPED_BASE", "cache_dir", "load_base"]

SHIPPED_BASE = Path(__file__).parent / "assets" / "base_tiny.safetensors"


def cache_dir() -> Path:
    return Path(os.environ.get("TINYSLIM_CACHE", Path.home() / ".cache" / "tinyslim"))


def load_base(path=None, *, progress: bool = True, log=print, with_source: bool = False):
    """The tiny base GPT: the checkpoint at `path` if given, else the shipped one, else the cached one,
    else pretrained now (minutes on two cores, with a progress bar) and cached.

    with_source=True returns (model, where it came from) instead of the model alone."""
    model, source = _find_base(path, progress, log)
    return (model, source) if with_source else model


def _find_base(path, progress: bool, log):
    from .data import CharTokenizer
    from .io import CheckpointError, load_model, save_model
    from .nn import GPTConfig
    from .train import PretrainConfig, pretrain

    if path is not None:  # a base the user pretrained: any GPT config, but a model checkpoint
        return load_model(path)[0], str(path)
    expected = GPTConfig(vocab_size=CharTokenizer().vocab_size)
    cached = cache_dir() / "base_tiny.safetensors"
    for candidate in (SHIPPED_BASE, cached):
        if candidate.is_file():
            try:
                return load_model(candidate, expect_config=expected)[0], str(candidate)
            except CheckpointError as err:
                log(f"warning: ignoring {candidate}: {err}")
    log(f"no base checkpoint found; pretraining one (about 10 minutes on 2 cores), cached at {cached}")
    model, _ = pretrain(expected, PretrainConfig(), out=cache_dir() / "pretrain_state.safetensors",
                        progress=progress, log=log)
    save_model(model, cached)
    return model, f"pretrained now, cached at {cached}"
