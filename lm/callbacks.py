"""The Trainer's callbacks that tell the world how a run goes: it started, its progress at a bounded
rate, each checkpoint saved, and a stop asked for from outside. Knows nothing of jobs, HTTP or what
is trained: each takes a callable or an event. transformers is imported inside the functions.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from models import JobProgress


def stop_callback(stop: threading.Event):
    """Ends training after the step during which `stop` was set (cancel, shutdown)."""
    from transformers import TrainerCallback

    class StopOnEvent(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if stop.is_set():
                control.should_training_stop = True

    return StopOnEvent()


def started_callback(started: threading.Event):
    """Sets `started` when the first training step begins (model loaded, data formatted)."""
    from transformers import TrainerCallback

    class Started(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            started.set()

    return Started()


def progress_callback(report, interval_s: float = 1.0):
    """Calls `report(JobProgress)` at most once per `interval_s` seconds, and at the last step."""
    from transformers import TrainerCallback


    class Progress(TrainerCallback):
        """Reports from on_log (logging_steps=1), which runs after the step's loss is known."""

        def __init__(self):
            # last = -inf: the first step is always reported (time.monotonic() may be under interval_s after boot)
            self.loss, self.last, self.began, self.first_step, self.reported = None, float("-inf"), None, 0, -1

        def on_train_begin(self, args, state, control, **kwargs):
            self.began, self.first_step = time.monotonic(), state.global_step
            self.tokens0 = state.num_input_tokens_seen

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.loss = float(logs["loss"])
                self._report(state, final=state.global_step >= state.max_steps or control.should_training_stop)

        def on_train_end(self, args, state, control, **kwargs):
            self._report(state, final=True)

        def _report(self, state, final: bool):
            now = time.monotonic()
            if (now - self.last < interval_s and not final) or state.global_step == self.reported:
                return
            self.last, self.reported = now, state.global_step
            elapsed = max(now - self.began, 1e-9)
            steps = state.global_step - self.first_step
            report(JobProgress(
                step=state.global_step,
                total_steps=state.max_steps,
                epoch=round(state.epoch or 0.0, 4),
                loss=self.loss,
                tokens_per_second=round((state.num_input_tokens_seen - self.tokens0) / elapsed, 2),
                eta_s=round(elapsed / steps * (state.max_steps - state.global_step), 1) if steps else None,
            ))

    return Progress()


def checkpoint_callback(report):
    """Calls `report(path)` with each checkpoint folder the Trainer saves."""
    from transformers import TrainerCallback

    class Checkpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            report(str(Path(args.output_dir) / f"checkpoint-{state.global_step}"))

    return Checkpoints()
