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


def row_tokens_for(device: str, batch_tokens: int) -> int:
    """Row length for a device. On the CPU, ROW_TOKENS (measured above). On CUDA, matrix products are
    cheap and each row costs launches, so rows are as long as the pack, up to CUDA_ROW_TOKENS: sdpa
    builds a dense block-diagonal mask per row and computes all T² pairs of it."""
    return min(batch_tokens, CUDA_ROW_TOKENS) if device.startswith("cuda") else ROW_TOKENS


# On CUDA: a pack is rows of at most this many tokens (see row_tokens_for); the GPU bench
# (bench/gpu_check.sh) compares 1024 with one row per pack.
CUDA_ROW_TOKENS = 1024
# The supervised positions' logits are computed this many at a time (1024 × 262k vocabulary ≈ 1 GiB
# of float32 per chunk): the full (supervised positions × vocabulary) float32 logits and their
# gradient are never held at once.
LOSS_CHUNK = 1024


def pack_examples(encoded: Sequence[Any], batch_tokens: int, seed: int,
                  row_tokens: int = ROW_TOKENS, pairs: Sequence[Any] = ()) -> list[dict[str, list]]:
    """One dataset item per pack: its rows of input_ids, labels and position_ids (unpadded). Each
    sample's first label is IGNORE, so no position predicts the first token of the next sample.

    `pairs` (lm.preference.Pair: chosen, rejected, ref; or None) go with the samples: `pairs[i]` is
    packed with `encoded[i]`, its own sample, both lines in the same pack (so no pack is without SFT
    tokens); pairs past the end of `encoded` are packed alone. Their supervised tokens are
    `pair_labels`, not `labels` (the SFT loss and the Trainer's token count see none of them), `seq`
    names each token's line (2 × the pair's index in the pack, + 1 for the rejected line; −1
    elsewhere), `refs` holds the pairs' base log-likelihoods (chosen, rejected, ...) and `pair_index`
    their indices in `pairs`."""
    units = [[(e, -1)] for e in encoded] + [[] for _ in range(len(pairs) - len(encoded))]
    for i, p in enumerate(pairs):
        if p is not None:
            units[i] += [(p.chosen, i), (p.rejected, i)]
    units = [u for u in units if u]
    items = []
    for pack in plan_packs([sum(len(e.input_ids) for e, _ in u) for u in units], batch_tokens, seed):
        members = [m for u in pack for m in units[u]]
        in_pack = list(dict.fromkeys(i for _, i in members if i >= 0))
        local = {i: k for k, i in enumerate(in_pack)}
        item: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
        if pairs:
            item.update(pair_labels=[], seq=[], refs=[r for i in in_pack for r in pairs[i].ref], pair_index=in_pack)
        lengths = [len(e.input_ids) for e, _ in members]
        for row in rows_of(lengths, max(row_tokens, max(lengths))):
            ids, labels, pair_labels, seq, positions = [], [], [], [], []
            for j in row:
                e, pair = members[j]
                supervised = [IGNORE] + list(e.labels[1:])
                ignored = [IGNORE] * len(e.input_ids)
                ids += e.input_ids
                labels += ignored if pair >= 0 else supervised
                pair_labels += supervised if pair >= 0 else ignored
                rejected = pair >= 0 and e is pairs[pair].rejected
                seq += [2 * local[pair] + rejected if pair >= 0 else -1] * len(e.input_ids)
                positions += range(len(e.input_ids))
            item["input_ids"].append(ids)
            item["labels"].append(labels)
            item["position_ids"].append(positions)
            if pairs:
                item["pair_labels"].append(pair_labels)
                item["seq"].append(seq)
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
    let packed samples attend to each other.

    Also `keep_index` (those positions as indices into the flattened rows) and `targets` (the token
    each of them predicts), so that the loss selects and compares without a boolean index on the
    device, which would wait for the GPU. One tensor is built per field from the flat token lists,
    and placed by index: no Python loop over rows builds tensors. `pad_to_multiple_of` rounds the
    width up (a fixed width keeps compiled attention kernels from recompiling)."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 1):
        self.pad_id = pad_id
        self.multiple = max(1, pad_to_multiple_of)

    def __call__(self, items: list[dict[str, list[list[int]]]]) -> dict[str, Any]:
        import itertools

        import torch

        ids = [row for item in items for row in item["input_ids"]]
        lengths = torch.tensor([len(row) for row in ids])
        rows, width = len(ids), int(lengths.max())
        width = -(-width // self.multiple) * self.multiple
        flat = lambda key: torch.tensor(list(itertools.chain.from_iterable(  # noqa: E731
            row for item in items for row in item[key])), dtype=torch.long)
        row_of = torch.repeat_interleave(torch.arange(rows), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        col = torch.arange(len(row_of)) - starts[row_of]
        input_ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        labels = torch.full((rows, width), IGNORE, dtype=torch.long)
        # padding positions count from 0 after each row's end: a "sample" of its own
        position_ids = torch.arange(width).repeat(rows, 1) - lengths[:, None]
        position_ids = torch.where(position_ids < 0, 0, position_ids)
        input_ids[row_of, col] = flat("input_ids")
        labels[row_of, col] = flat("labels")
        position_ids[row_of, col] = flat("position_ids")
        batch = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
        supervised = labels
        if "pair_labels" in items[0]:  # preference pairs: their lines are scored, and are not SFT's
            offsets = list(itertools.accumulate((len(item["pair_index"]) for item in items), initial=0))
            shifted = [[v + 2 * offsets[k] if v >= 0 else -1 for v in row] for k, item in enumerate(items) for row in item["seq"]]
            pair_labels, seq = torch.full_like(labels, IGNORE), torch.full_like(labels, -1)
            pair_labels[row_of, col] = flat("pair_labels")
            seq[row_of, col] = torch.tensor(list(itertools.chain.from_iterable(shifted)), dtype=torch.long)
            supervised = torch.where(labels != IGNORE, labels, pair_labels)
            batch["refs"] = torch.tensor([r for item in items for r in item["refs"]], dtype=torch.float32).view(-1, 2)
        keep = torch.nn.functional.pad(supervised[:, 1:] != IGNORE, (0, 1))
        keep_index = keep.flatten().nonzero().flatten()
        batch.update(logits_to_keep=keep, keep_index=keep_index, targets=supervised.flatten()[keep_index + 1])
        if "refs" in batch:
            batch["sft"] = labels.flatten()[keep_index + 1] != IGNORE  # which kept positions SFT counts
            batch["seq"] = seq.flatten()[keep_index + 1]  # and which line of which pair the others score
        return batch


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


def linear_cross_entropy(hidden, weight, targets, chunk: int = LOSS_CHUNK, softcap: float | None = None,
                         per_token: bool = False):
    """sum over i of −log softmax(softcap(hidden[i] @ weight.T))[targets[i]] (each i's term with
    `per_token`), the output layer and the loss in one, `chunk` rows at a time: at most (chunk × vocabulary) logits exist at once, in
    float32, and they are freed before the next chunk. The gradient for `hidden` is computed in the
    same pass (softmax − one-hot, times the weight), as Liger's fused linear cross-entropy does, so
    nothing is recomputed in backward. `weight` must be frozen (it is: LoRA trains neither the
    embeddings nor the output layer)."""
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight):
            w = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
            grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            losses = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            for s in range(0, hidden.shape[0], chunk):
                t = targets[s:s + chunk]
                z = (hidden[s:s + chunk] @ w.T).to(torch.promote_types(w.dtype, torch.float32))
                if softcap is not None:
                    tanh = torch.tanh(z / softcap)
                    z = tanh * softcap
                lse = torch.logsumexp(z, dim=-1)
                losses[s:s + chunk] = lse - z.gather(1, t[:, None]).squeeze(1)
                if grad is not None:
                    g = torch.exp(z.sub_(lse[:, None]))  # softmax, in z's memory
                    g[torch.arange(len(t), device=g.device), t] -= 1
                    if softcap is not None:
                        g *= 1 - tanh * tanh
                    grad[s:s + chunk] = g.to(w.dtype) @ w
            ctx.save_for_backward(grad)
            return losses if per_token else losses.sum()

        @staticmethod
        def backward(ctx, grad_output):  # each term depends on its own row of `hidden` only
            (grad,) = ctx.saved_tensors
            scale = grad_output.to(grad.dtype)
            return grad * (scale[:, None] if per_token else scale), None

    if weight.requires_grad:
        raise ValueError("linear_cross_entropy computes no gradient for the output layer; freeze it")
    return LinearCrossEntropy.apply(hidden, weight)


def _base(model):
    """The transformers model inside DDP and peft wrappers."""
    while hasattr(model, "module"):  # DistributedDataParallel
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class _HiddenStates:
    """While active, the model's output layer is the identity: its forward returns the final hidden
    states as "logits", and linear_cross_entropy applies the real output layer in chunks. The call
    still goes through the model's (and any DDP / autocast wrapper's) forward."""

    def __init__(self, model):
        import torch

        self.base = _base(model)
        self.head = self.base.get_output_embeddings()
        self.identity = torch.nn.Identity()

    def __enter__(self):
        self.base.set_output_embeddings(self.identity)
        return self.head

    def __exit__(self, *exc):
        self.base.set_output_embeddings(self.head)


def fused_loss_supported(model) -> bool:
    """Whether `packed_loss` may replace the model's output layer: a plain bias-free linear head,
    frozen, with no logit scaling of another kind than Gemma's soft-capping."""
    import torch

    base = _base(model)
    head = base.get_output_embeddings()
    config = base.config
    return (type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad
            and not any(getattr(config, k, None) not in (None, 1, 1.0) for k in ("logit_scale", "logits_scaling")))


# Set to False to compute full logits at supervised positions and `supervised_loss` (the earlier
# path; the bench's `project-plain` method); `packed_loss` falls back to it by itself where
# fused_loss_supported is False.
FUSED_LOSS = True


def token_losses(model, batch: dict[str, Any], per_token: bool = True):
    """−log p(target) at each kept position (`keep_index` order; their sum without `per_token`). The
    model runs its body (`input_ids` and `position_ids`, no attention_mask), and then the output layer
    and the loss run only at `keep_index`, in chunks (linear_cross_entropy). No step of it waits for
    the GPU. Where fused_loss_supported is False, the model computes the logits at those positions."""
    import torch

    targets = batch["targets"]
    if not (FUSED_LOSS and fused_loss_supported(model)):
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       logits_to_keep=batch["logits_to_keep"], use_cache=False).logits
        losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.to(logits.device),
                                                   reduction="none")
        return losses if per_token else losses.sum()
    base = _base(model)
    softcap = getattr(base.config, "final_logit_softcapping", None)
    with _HiddenStates(model) as head:
        hidden = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    hidden = hidden.flatten(0, 1).index_select(0, batch["keep_index"])
    return linear_cross_entropy(hidden, head.weight, targets, LOSS_CHUNK, softcap, per_token)


def _pair_sums(losses, batch: dict[str, Any]):
    """(pairs, 2): the log-likelihood of each pair's chosen and rejected line, from the token losses."""
    import torch

    scored = batch["seq"] >= 0
    sums = torch.zeros(2 * batch["refs"].shape[0], dtype=losses.dtype, device=losses.device)
    return sums.index_add(0, batch["seq"][scored], -losses[scored]).view(-1, 2)


def pair_logps(model, batch: dict[str, Any]):
    """The pairs' log-likelihoods under `model` ((pairs, 2): chosen, rejected)."""
    return _pair_sums(token_losses(model, batch), batch)


def packed_loss(model, batch: dict[str, Any], num_items_in_batch=None, preference: Any = None):
    """The loss of a collated batch: the mean negative log-likelihood of each supervised next token
    (the sum over `num_items_in_batch` when given). With preference pairs in the batch and
    `preference` (lm.preference.Objective: `weight`, `loss(logps, refs)` → per-pair terms and margins,
    and a `stats` dict appended to) it adds weight × the mean of the pairs' terms, scaled by this
    batch's share of the step's supervised tokens, so that accumulated batches add up to one mean."""
    sft = batch.get("sft")
    tokens = int(sft.sum()) if sft is not None else batch["targets"].numel()
    count = num_items_in_batch if num_items_in_batch is not None else tokens
    if sft is None:  # no pairs: the sum is all that is needed
        return token_losses(model, batch, per_token=False) / count
    losses = token_losses(model, batch)
    loss = losses[sft].sum() / count
    if preference is None or not batch["refs"].shape[0]:
        return loss
    terms, margin = preference.loss(_pair_sums(losses, batch), batch["refs"].to(losses.device))
    preference.stats.setdefault("recent", []).append(
        (float(terms.detach().mean()), float(margin.mean()), float((margin > 0).float().mean())))
    del preference.stats["recent"][:-20]
    share = tokens / float(count)
    return loss + preference.weight * terms.mean() * share


def trainer_class():
    """transformers' Trainer with `packed_loss` as its loss (the batch keys `keep_index` and
    `targets` are the loss's, not the model's, so compute_loss_func alone would not do), and the
    preference objective when given one."""
    from transformers import Trainer

    class PackedTrainer(Trainer):
        def __init__(self, *args, preference: Any = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.model_accepts_loss_kwargs = True  # the loss takes num_items_in_batch: the Trainer counts it
            self.preference = preference  # lm.preference.Objective, or None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = packed_loss(model, inputs, num_items_in_batch, self.preference)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                # as Trainer.compute_loss: the count is of all processes, and DDP averages gradients
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            return (loss, None) if return_outputs else loss

    return PackedTrainer


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
                total += float(packed_loss(model, batch, num_items_in_batch=1))
            tokens += batch["targets"].numel()
    finally:
        model.train(was_training)
    return total, tokens
