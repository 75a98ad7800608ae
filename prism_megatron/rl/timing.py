"""The one owner of an RL step's phase timings and their metrics.

    timer = StepTimer()
    with timer.phase("logprob", tokens=n):   # or timer.add("rollout", seconds, tokens)
        ...
    metrics.update(timer.metrics())

Metrics: ``time/<phase>_s``, ``perf/<phase>_tokens_per_s`` (phases given tokens),
``time/step_s`` (since the timer started), ``perf/generation_fraction`` (``rollout`` seconds /
step seconds: above 0 and possibly near 1 when generation overlaps training, since the
generation of the next step is then counted in the step that ran it) and ``time/wait_s``, the
sum of the waiting phases (``wait_*``: on the in-flight generation, in the sync).
"""

from __future__ import annotations

import contextlib
import time


class StepTimer:
    def __init__(self):
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.tokens: dict[str, int] = {}

    def add(self, name: str, seconds: float, tokens: int = 0) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        if tokens:
            self.tokens[name] = self.tokens.get(name, 0) + tokens

    @contextlib.contextmanager
    def phase(self, name: str, tokens: int = 0):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start, tokens)

    def metrics(self) -> dict[str, float]:
        step = time.perf_counter() - self.started
        out = {f"time/{name}_s": s for name, s in self.seconds.items()}
        out.update({f"perf/{name}_tokens_per_s": n / max(self.seconds.get(name, 0.0), 1e-9)
                    for name, n in self.tokens.items()})
        out["time/step_s"] = step
        out["perf/generation_fraction"] = self.seconds.get("rollout", 0.0) / max(step, 1e-9)
        out["time/wait_s"] = sum(s for name, s in self.seconds.items() if name.startswith("wait_"))
        return out
