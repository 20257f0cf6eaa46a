"""The best pass by held-out loss: a Trainer callback that measures the held-out loss after each pass,
keeps the best pass's LoRA weights and stops when more passes stop helping, so that training never
makes an adapter silently worse than an earlier pass of itself. Knows nothing of files, jobs or how
the held-out samples were chosen: it takes a model and encoded samples. transformers and peft are
imported inside the function.
"""

from __future__ import annotations

import logging
from typing import Any

from lm import chat_format, packing

log = logging.getLogger("persona_lora.train")


def best_pass_callback(model, held_out: list[chat_format.Encoded], patience: int):
    """The held-out loss before training (the base: LoRA's B starts at 0) and after each pass; keeps the best
    pass's LoRA weights in memory, stops `patience` passes after it and puts them back at the end. Not the
    Trainer's load_best_model_at_end: its eval loop does not compute packing.packed_loss, and it saves
    whole checkpoints to disk. `passes` is its record (training_info.json, the report)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import TrainerCallback

    def held_out_loss() -> float:
        return round((lambda total, tokens: total / max(tokens, 1))(*packing.loss_sums(model, held_out)), 4)

    class BestPass(TrainerCallback):
        def __init__(self):
            self.passes: dict[str, Any] = {"held_out_loss": [], "kept": None, "stopped_early": False, "patience": patience}
            self.best, self.state, self.waited = float("inf"), None, 0

        def on_train_begin(self, args, state, control, **kwargs):
            if not self.passes["held_out_loss"]:
                self.passes["held_out_loss"].append(held_out_loss())  # pass 0: the base

        def on_epoch_end(self, args, state, control, **kwargs):
            loss = held_out_loss()
            self.passes["held_out_loss"].append(loss)
            if loss < self.best:
                self.best, self.waited, self.passes["kept"] = loss, 0, len(self.passes["held_out_loss"]) - 1
                self.state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
            else:
                self.waited += 1
                if self.waited >= patience:
                    self.passes["stopped_early"] = state.global_step < state.max_steps
                    control.should_training_stop = True
            return control

        def on_train_end(self, args, state, control, **kwargs):
            if self.state is not None and self.passes["kept"] != len(self.passes["held_out_loss"]) - 1:
                set_peft_model_state_dict(model, self.state)
                log.info("kept pass %d of %d: held-out loss %.4f (per pass, base first: %s)", self.passes["kept"],
                         len(self.passes["held_out_loss"]) - 1, self.best, self.passes["held_out_loss"])

    return BestPass()
