"""Token-budgeted, padding-free batches and the loss on supervised positions only.

Persona data is thousands of short samples. Training them one per step spends little compute per
step, and computing the output layer over every position costs more than the rest of the network
for the default model (262k-token vocabulary × 640 ≈ 168M weights, against ≈100M in its 18 layers).
So samples are grouped into packs of at most `batch_tokens` tokens; a pack's samples are laid out
in rows (best fit, longest first) with `position_ids` that restart at 0 for each sample and no
`attention_mask`: transformers then derives the sample boundaries from `position_ids` and no
sample attends to another. Logits are computed only where the next token is supervised.

Knows nothing of models, files or HTTP: it takes `Encoded` samples (ids and labels) and gives
batches; the loss takes model outputs. torch is imported inside functions.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

IGNORE = -100
# A pack's rows hold this many tokens (or its longest sample): shorter rows make small matrix
# products, longer ones spend attention on pairs of positions that the block-diagonal mask throws
# away (T² per row). On the 2-core dev CPU (8-bit gemma-3-270m, forward+backward), 1024-token
# batches ran at 150/193/179/174/129 tok/s in rows of 64/128/256/512/1024.
ROW_TOKENS = 256


def plan_packs(lengths: Sequence[int], batch_tokens: int, seed: int) -> list[list[int]]:
    """Sample indices grouped into packs of at most `batch_tokens` tokens (a longer sample is a pack
    of its own). The order is shuffled with `seed` first, so a pack mixes lengths the way a random
    batch would, and the same data and seed give the same packs."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    packs: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        if current and used + lengths[i] > batch_tokens:
            packs.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        packs.append(current)
    return packs


def rows_of(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices into `lengths` laid out in as few rows of `capacity` as it finds
    (a sample longer than `capacity` gets a row of its own)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [r for r in range(len(rows)) if free[r] >= lengths[i]]
        if fits:
            best = min(fits, key=lambda r: free[r])
            rows[best].append(i)
            free[best] -= lengths[i]
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


# Packs shrink so that an epoch has at least this many steps: a few dozen samples packed into two
# or three steps learn nothing (36 samples of the style test in 4 steps: the phrase in 0% of
# generations), and small data is cheap to train one sample at a time anyway.
MIN_STEPS_PER_EPOCH = 32


def step_tokens(total_tokens: int, batch_tokens: int) -> int:
    """The token budget of a pack: `batch_tokens`, or less where the data would give fewer than
    MIN_STEPS_PER_EPOCH steps."""
    return max(1, min(batch_tokens, total_tokens // MIN_STEPS_PER_EPOCH))


def scaled_learning_rate(learning_rate: float, samples_per_step: float) -> float:
    """`learning_rate` is the rate for one sample per step (the classic loop); a step over k samples
    takes it times k, the linear scaling rule (Goyal et al., 2017), so that an epoch of k-sample
    steps moves the adapter about as far as an epoch of single samples. Measured on the default
    model (bench/train_throughput.py, 192 samples, 4.5 per step), the held-out loss was 4.04 with
    √k scaling, 3.60 with k, and 3.40 with k from a base rate of 3e-4 (the seed loop: 3.49)."""
    return learning_rate * max(1.0, samples_per_step)


def pack_examples(encoded: Sequence[Any], batch_tokens: int, seed: int) -> list[dict[str, list[list[int]]]]:
    """One dataset item per pack: its rows of input_ids, labels and position_ids (unpadded). Each
    sample's first label is IGNORE, so no position predicts the first token of the next sample."""
    items = []
    for pack in plan_packs([len(e.input_ids) for e in encoded], batch_tokens, seed):
        lengths = [len(encoded[i].input_ids) for i in pack]
        item: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
        for row in rows_of(lengths, max(ROW_TOKENS, max(lengths))):
            ids, labels, positions = [], [], []
            for j in row:
                e = encoded[pack[j]]
                ids += e.input_ids
                labels += [IGNORE] + list(e.labels[1:])
                positions += range(len(e.input_ids))
            item["input_ids"].append(ids)
            item["labels"].append(labels)
            item["position_ids"].append(positions)
        items.append(item)
    return items


def single_examples(encoded: Sequence[Any]) -> list[dict[str, list[list[int]]]]:
    """One dataset item per sample (packing off): a pack of one row."""
    return [{"input_ids": [list(e.input_ids)], "labels": [[IGNORE] + list(e.labels[1:])],
             "position_ids": [list(range(len(e.input_ids)))]} for e in encoded]


class PackedCollator:
    """Stacks the rows of one or more packs into (rows, longest row) tensors: `input_ids`,
    `position_ids`, `labels`, and `logits_to_keep`, a boolean mask of the positions whose next token
    is supervised. Row ends are filled with `pad_id`, IGNORE labels and positions counting from 0
    (a padding "sample" that only attends to itself). No `attention_mask`: with one, the model would
    let packed samples attend to each other."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, list[list[int]]]]) -> dict[str, Any]:
        import torch

        rows = [(ids, labels, pos) for item in items
                for ids, labels, pos in zip(item["input_ids"], item["labels"], item["position_ids"])]
        width = max(len(ids) for ids, _, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        position_ids = torch.arange(width).repeat(len(rows), 1)
        for r, (ids, lab, pos) in enumerate(rows):
            n = len(ids)
            input_ids[r, :n] = torch.tensor(ids)
            labels[r, :n] = torch.tensor(lab)
            position_ids[r, :n] = torch.tensor(pos)
            position_ids[r, n:] = torch.arange(width - n)
        keep = torch.nn.functional.pad(labels[:, 1:] != IGNORE, (0, 1))
        return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels, "logits_to_keep": keep}


def supervised_loss(outputs, labels, num_items_in_batch=None):
    """Cross-entropy over the positions the model computed logits for (`logits_to_keep`), which are
    exactly those with a supervised next token, in the same row-major order. The Trainer's
    `compute_loss_func`: divided by `num_items_in_batch` (the supervised tokens of the whole step,
    across accumulation and processes) when it is given."""
    import torch

    targets = labels[:, 1:]
    targets = targets[targets != IGNORE]
    logits = outputs.logits if hasattr(outputs, "logits") else outputs["logits"]
    loss = torch.nn.functional.cross_entropy(logits.float(), targets.to(logits.device), reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else targets.numel()
    return loss / count


def loss_sums(model, encoded: Sequence[Any], batch_tokens: int = 2048) -> tuple[float, int]:
    """(sum of the negative log-likelihoods, supervised tokens) of `encoded` under `model`, in packed
    batches without gradients: the held-out loss of a run, in a fraction of the per-sample time."""
    import torch

    collate = PackedCollator(pad_id=0)
    total, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for item in pack_examples(encoded, batch_tokens, seed=0):
            batch = {k: v.to(model.device) for k, v in collate([item]).items()}
            with torch.no_grad():
                out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                            logits_to_keep=batch["logits_to_keep"], use_cache=False)
                n = int(batch["logits_to_keep"].sum())
                total += float(supervised_loss(out, batch["labels"], num_items_in_batch=1))
                tokens += n
    finally:
        model.train(was_training)
    return total, tokens
