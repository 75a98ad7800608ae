"""A stage's checkpoints: cadence, resume, and every piece of state that a resumed run needs.

``Checkpoints`` owns the stage's main trainer (its model, optimizer, LR schedule, RNG and skip
counters are saved by ``Trainer.save``), the stateful objects beside it (the prompt sampler, the
SFT skip monitor: anything with ``state_dict`` / ``load_state_dict``) and companions saved with
it at the same step (the alignment stage's discriminator, saved FIRST so that a policy step on
disk always has its discriminator). ``checkpoint.save_interval`` and the final step set the
cadence; ``checkpoint.keep_last`` / ``checkpoint.resume`` are applied by the trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Companion(Protocol):
    def save(self, step: int) -> object: ...

    def resume_at(self, step: int) -> None: ...


class Snapshot:
    """The state of an object that runs ahead of training (a prefetching loader): what it was
    when the last trained step was drawn (``at``), restored into ``target`` on resume."""

    def __init__(self, target: Stateful):
        self.target = target
        self.state = target.state_dict()

    def at(self, state: dict) -> None:
        self.state = state

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.target.load_state_dict(state)
        self.state = state


class Checkpoints:
    def __init__(self, cfg, trainer, *, state: dict[str, Stateful] | None = None,
                 companions: tuple[Companion, ...] = (), initial: Callable[[], None] | None = None):
        """``initial``: what a run that starts at step 0 loads (e.g. the upcycled discriminator
        weights); ``companions`` resume at the main trainer's step."""
        self.cfg = cfg.checkpoint
        self.trainer = trainer
        self.state = dict(state or {})
        self.companions = companions
        self.initial = initial

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.enabled and self.cfg.save_dir)

    def resume(self) -> int:
        """Restore everything from the checkpoint ``checkpoint.resume`` selects; returns the
        step reached (0: a fresh start, ``initial`` applied)."""
        resumed = self.trainer.maybe_resume()
        for name, obj in self.state.items():
            if name in resumed:
                obj.load_state_dict(resumed[name])
        step = int(resumed.get("step", 0))
        if not resumed and self.initial is not None:
            self.initial()
        for companion in self.companions:
            companion.resume_at(step)
        return step

    def due(self, step: int, total: int) -> bool:
        return self.enabled and (step % self.cfg.save_interval == 0 or step == total)

    def save(self, step: int) -> Path | None:
        for companion in self.companions:
            companion.save(step)
        return self.trainer.save(step, {name: obj.state_dict() for name, obj in self.state.items()})
