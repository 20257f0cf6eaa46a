"""The preference objective: beside the SFT loss, each training sample's real reply is preferred over
a line another participant of the same conversations said, in the same (recent) context, with the
frozen base model as the reference (DPO, Rafailov et al. 2023):

    −log σ(β · [(log π(reply) − log π_base(reply)) − (log π(other's line) − log π_base(other's line))])

SFT alone makes the person's replies likely, and the adapter learns the genre of the conversation:
any character's lines gain about as much as the person's own. The negatives are free (the stored
contexts hold everyone's turns), and the reference keeps the term from simply pushing every line
down: only what sets the person apart from the others moves.

A pair is the sample's last `context_turns` turns followed by the reply as the person's line, and the
same turns followed by another participant's line of similar length as the person's line (a
length-matched negative: otherwise the term learns length, not voice). Pairs train in the same packs
as the samples (packing.pack_examples), so the schedule and learning rate are SFT's.

Knows nothing of files, jobs, HTTP or the Trainer: it takes samples, a tokenizer and a model.
torch is imported inside functions.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

from lm import chat_format
from models import Sample, Turn

# A negative's length, in words, is within this factor of the reply's (widened when none is).
LENGTH_FACTOR = 1.5


@dataclass
class Objective:
    """The term's weight beside SFT (PREFERENCE_WEIGHT), DPO's β (PREFERENCE_BETA), and what the loss
    records of the last steps (summary)."""

    weight: float
    beta: float
    stats: dict[str, Any] = field(default_factory=dict)

    def loss(self, logps, refs):
        return dpo_loss(logps, refs, self.beta)


@dataclass
class Pair:
    chosen: chat_format.Encoded
    rejected: chat_format.Encoded
    ref: tuple[float, float] = (0.0, 0.0)  # log-likelihoods of chosen and rejected under the base


def _words(text: str) -> int:
    return len(text.split())


def negatives(samples: Sequence[Sample], speaker: str, seed: int) -> list[str | None]:
    """For each sample, a line another participant said in the samples' contexts, of about the reply's
    length and not in that sample's own context (None where there is none: a one-voice chat). The
    same samples and seed give the same lines. The pool is sorted by length, so each choice is a
    bisection and a few draws, not a scan: 100,000 samples take seconds."""
    own = {s.reply.strip() for s in samples}
    pool = sorted({t.content.strip() for s in samples for t in s.context
                   if t.speaker != speaker and t.content.strip() and t.content.strip() not in own},
                  key=lambda line: (_words(line), line))
    lengths = [max(1, _words(line)) for line in pool]
    rng = random.Random(seed)
    chosen: list[str | None] = []
    for s in samples:
        seen = {t.content.strip() for t in s.context}
        n = max(1, _words(s.reply))
        pick = None
        for factor in (LENGTH_FACTOR, 3.0, float("inf")):
            lo, hi = bisect.bisect_left(lengths, n / factor), bisect.bisect_right(lengths, n * factor)
            for _ in range(8 if hi > lo else 0):
                line = pool[rng.randrange(lo, hi)]
                if line not in seen:
                    pick = line
                    break
            if pick is not None:
                break
        chosen.append(pick)
    return chosen


def encode_pairs(samples: Sequence[Sample], speaker: str, tokenizer, template: str, max_len: int,
                 context_turns: int, seed: int) -> list[Pair | None]:
    """Each sample's pair (None where it has no negative, or a line does not fit `max_len`), encoded as
    training encodes a sample: only the line written as the person's is supervised."""
    pairs: list[Pair | None] = []
    for sample, other in zip(samples, negatives(samples, speaker, seed)):
        pair = None
        if other is not None:
            context: list[Turn] = list(sample.context)[-context_turns:] if context_turns else []
            short = sample.model_copy(update={"context": context})
            chosen = chat_format.format_sample(short, speaker, tokenizer, template, max_len)
            rejected = chat_format.format_sample(short.model_copy(update={"reply": other}), speaker, tokenizer, template, max_len)
            pair = Pair(chosen, rejected) if chosen is not None and rejected is not None else None
        pairs.append(pair)
    return pairs


def dpo_loss(logps, refs, beta: float):
    """Per pair: −log σ(β · margin), and the margin itself. `logps` and `refs` are (pairs, 2):
    log-likelihoods of the chosen and the rejected line, under the model and under the base."""
    import torch

    ratios = logps - refs
    margin = ratios[:, 0] - ratios[:, 1]
    return -torch.nn.functional.logsigmoid(beta * margin), margin.detach()


def reference_logps(model, pairs: list[Pair | None], batch_tokens: int = 2048) -> None:
    """Fill each pair's `ref` with the base's log-likelihoods: run before the first step, when LoRA's B
    is still 0 and the model is the base (dropout off), without gradients."""
    import torch

    from lm import packing

    collate = packing.PackedCollator(pad_id=0)
    was_training = model.training
    model.eval()
    try:
        for item in packing.pack_examples([], batch_tokens, seed=0, pairs=pairs):
            batch = {k: v.to(model.device) for k, v in collate([item]).items()}
            with torch.no_grad():
                logps = packing.pair_logps(model, batch)
            for local, index in enumerate(item["pair_index"]):
                pairs[index].ref = (float(logps[local, 0]), float(logps[local, 1]))
    finally:
        model.train(was_training)


def summary(stats: dict[str, Any]) -> dict[str, Any]:
    """What training_info.json keeps of the term: pairs, the final steps' mean loss, margin and the share of
    pairs whose real reply the adapter prefers more than the base did."""
    recent = stats.get("recent", [])
    if not recent:
        return {k: v for k, v in stats.items() if k != "recent"}
    mean = lambda i: round(sum(r[i] for r in recent) / len(recent), 4)  # noqa: E731
    return {**{k: v for k, v in stats.items() if k != "recent"},
            "loss": mean(0), "margin": mean(1), "accuracy": mean(2)}
