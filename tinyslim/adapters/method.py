"""The ``Method`` contract that the experiment runner codes against: attach, the training hooks, the
learners it evaluates, and its checkpoint state."""
from __future__ import annotations

import contextlib
import dataclasses

import numpy as np

from ..autograd import Tensor, no_grad
from ..nn import GPT
from .streams import Streams
from .verbs import adapted_layers, adapter_state_dict, inject, load_adapter_state_dict, mark_only_adapters_trainable

__all__ = ["Method"]


class Method:
    """One adapter method as the experiment runner sees it. The runner does::

        method.attach(model, seed)
        opt = Adam(method.trainable_parameters(), lr)
        for t, task in enumerate(tasks):
            method.before_task(t, steps, opt)
            for step in range(steps):
                loss = method.loss(x, y, mask, rng)
                opt.zero_grad(); loss.backward(); opt.step()
                method.after_step(step, opt)
            method.after_task(t)
            for learner in method.learners():
                with method.evaluating(learner):
                    ... model(x) ...

    Subclasses set ``name`` and ``config_class`` (a dataclass with ``target_modules`` and
    ``make_layer(linear, streams)``) and override the hooks they need.
    """

    name: str = "method"
    config_class = None

    def __init__(self, config=None, **overrides):
        if self.config_class is None:
            raise TypeError(f"{type(self).__name__} sets no config_class")
        fields = sorted(f.name for f in dataclasses.fields(self.config_class))
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise ValueError(f"{self.name}: unknown config fields {unknown}; the fields of "
                             f"{self.config_class.__name__} are {fields}")
        if config is None:
            config = self.config_class(**overrides)
        elif not isinstance(config, self.config_class):
            raise TypeError(f"{self.name} takes a {self.config_class.__name__}, got {type(config).__name__}")
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.model = None
        self.adapted: list = []
        self.task_id = -1

    # ---- set-up ------------------------------------------------------------------------------------
    def attach(self, model: GPT, seed: int) -> None:
        """Freeze the model and inject this method's adapters (random draws from the run seed's streams)."""
        if self.model is not None:
            raise RuntimeError(f"{self.name}: attach() was already called; make a new method for another model")
        self.model = model
        self.streams = Streams(seed)
        self.adapted = self._inject(model)

    def layers(self) -> list:
        """The adapted layers, in model order."""
        self._check_attached()
        return [layer for _, layer in self._adapted_layers()]

    def trainable_parameters(self) -> list:
        """What the runner's optimizer trains. The objects stay the same for the whole run (knots and
        re-initialisations write into them in place)."""
        self._check_attached()
        return self.model.parameters(trainable_only=True)

    # ---- the engine: the NumPy one here; tinyslim.torch.TorchMethod overrides these -------------------
    def _inject(self, model) -> list:
        """Freeze the model, wrap the targeted layers, let only the adapters train; the adapted names."""
        model.freeze()
        names = inject(model, self.config, self.streams)
        mark_only_adapters_trainable(model)
        return names

    def _adapted_layers(self) -> list:
        return adapted_layers(self.model)

    def _no_grad(self):
        return no_grad()

    def _adapter_arrays(self) -> dict:
        return adapter_state_dict(self.model)

    def _load_adapter_arrays(self, arrays: dict) -> None:
        load_adapter_state_dict(self.model, arrays)

    # ---- training hooks ----------------------------------------------------------------------------
    def before_task(self, task_id: int, steps: int, optimizer) -> None:
        """Start task `task_id` (`steps` optimizer steps follow). Default: reset the optimizer state."""
        self._check_attached()
        self.task_id = task_id
        optimizer.reset_state()

    def loss(self, x, y, mask, rng: np.random.Generator | None = None) -> Tensor:
        """The full training loss of one batch of the current task: x, y int (B, T), mask (B, T) 0/1
        (the answer positions the cross-entropy counts). `rng` drives the model's own dropout."""
        self._check_attached()
        _, loss = self.model(x, y, loss_mask=mask, rng=rng)
        return loss

    def after_step(self, step: int, optimizer) -> None:
        """Called after every optimizer step (I-LoRA interpolates, COLA ties knots here)."""

    def after_task(self, task_id: int) -> None:
        """Called after the last step of a task, before evaluation."""

    # ---- evaluation --------------------------------------------------------------------------------
    def learners(self) -> list:
        """Names of the models this method can evaluate; the first is the one reported."""
        return ["default"]

    def _set_learner(self, learner: str) -> str:
        """Make `learner` active; returns the previously active one."""
        if learner != "default":
            raise ValueError(f"{self.name} has the learners {self.learners()}, got {learner!r}")
        return "default"

    @contextlib.contextmanager
    def evaluating(self, learner: str | None = None):
        """model.eval(), gradients off and `learner` (default: the reported one) active inside;
        restores the training mode and the active learner on exit. Yields the model."""
        self._check_attached()
        learner = self.learners()[0] if learner is None else learner
        was_training = self.model.training
        previous = self._set_learner(learner)
        self.model.eval()
        try:
            with self._no_grad():
                yield self.model
        finally:
            self._set_learner(previous)
            self.model.train(was_training)

    # ---- checkpoints (resuming a run) ---------------------------------------------------------------
    def state_dict(self) -> tuple[dict, dict]:
        """(arrays, meta): everything an interrupted run needs to go on exactly as if uninterrupted — the
        adapter arrays ("adapter.<module>.<array>"), the current task and the state of every named RNG
        stream. ``meta`` is JSON-serialisable. Methods with more state (a replay buffer, step counters,
        tied knots) extend both dicts; the optimizer's state is the runner's."""
        self._check_attached()
        arrays = {f"adapter.{k}": v for k, v in self._adapter_arrays().items()}
        meta = {"method": self.name, "task_id": int(self.task_id), "streams": self.streams.state_dict()}
        return arrays, meta

    def load_state_dict(self, arrays: dict, meta: dict) -> None:
        """Restore ``state_dict()``'s output into an attached method of the same config (in place: the
        optimizer keeps its parameter references). Another method, or arrays that do not fit, raise."""
        self._check_attached()
        if meta.get("method") != self.name:
            raise ValueError(f"{self.name}: the state was saved from method {meta.get('method')!r}")
        self._load_adapter_arrays({k[len("adapter."):]: v for k, v in arrays.items() if k.startswith("adapter.")})
        self.task_id = int(meta["task_id"])
        self.streams.load_state_dict(meta["streams"])

    def describe(self) -> dict:
        """Name, config (as a dict) and, once attached, the adapted modules and trainable parameter count."""
        out = {"name": self.name, "config": dataclasses.asdict(self.config)}
        if self.model is not None:
            out["adapted_modules"] = list(self.adapted)
            out["trainable_parameters"] = int(sum(int(np.prod(p.shape)) for p in self.trainable_parameters()))
        return out

    def _check_attached(self):
        if self.model is None:
            raise RuntimeError(f"{self.name}: call method.attach(model, seed) first")

    def __repr__(self):
        return f"{type(self).__name__}({self.config})"
