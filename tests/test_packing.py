"""Packed, padding-free batches: same numbers as one sample at a time, no attention across samples,
logits and loss on supervised positions only."""

from __future__ import annotations

import pytest

import packing
from chat_format import Encoded


def _encoded(lengths, reply=3, vocab=300, seed=0):
    import random

    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [2] + [rng.randrange(6, vocab) for _ in range(n - 1)]
        labels = [-100] * (n - reply) + ids[n - reply:]
        out.append(Encoded(ids, labels))
    return out


def test_plan_packs_respects_the_budget_and_keeps_every_sample_once():
    lengths = [5, 40, 17, 90, 3, 64, 300, 12, 12, 7] * 7
    packs = packing.plan_packs(lengths, batch_tokens=128, seed=1)
    flat = sorted(i for p in packs for i in p)
    assert flat == list(range(len(lengths)))
    for p in packs:
        assert sum(lengths[i] for i in p) <= 128 or len(p) == 1  # a 300-token sample is a pack alone
    assert packing.plan_packs(lengths, 128, seed=1) == packs  # deterministic
    assert packing.plan_packs(lengths, 128, seed=2) != packs


def test_rows_best_fit_never_overflow():
    lengths = [200, 56, 100, 100, 56, 250, 6]
    rows = packing.rows_of(lengths, 256)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 256 for r in rows)
    assert len(rows) == 3  # 768 tokens fill 3 rows of 256 exactly: 250+6, 200+56, 100+100+56


def test_collator_marks_supervised_next_tokens_and_resets_positions():
    enc = _encoded([6, 4, 5], reply=2)
    item = packing.pack_examples(enc, batch_tokens=100, seed=0)[0]
    batch = packing.PackedCollator(pad_id=0)([item])
    assert "attention_mask" not in batch
    assert batch["input_ids"].shape == (1, 15)
    pos = batch["position_ids"][0].tolist()
    assert sorted(pos) == sorted(list(range(6)) + list(range(4)) + list(range(5)))
    labels = batch["labels"][0]
    keep = batch["logits_to_keep"][0]
    # logits are kept exactly where the next token is supervised: 2 reply tokens per sample
    assert int(keep.sum()) == 6
    assert keep.tolist()[:-1] == (labels[1:] != -100).tolist()
    # the first token of every sample is never a target
    starts = [i for i, p in enumerate(pos) if p == 0]
    assert all(labels[i] == -100 for i in starts)


def _model(path):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    return model.eval()


@pytest.mark.parametrize("arch", ["tiny_gemma", "tiny_llama"])
def test_packed_samples_do_not_attend_to_each_other(arch, request):
    """Each sample's logits in a packed batch equal its logits alone. The test also shows why no
    attention_mask may be passed: with an all-ones mask the later samples see the earlier ones."""
    import torch

    model = _model(request.getfixturevalue(arch))
    enc = _encoded([9, 14, 5, 11, 7, 20], reply=4)
    item = packing.pack_examples(enc, batch_tokens=1000, seed=0)[0]
    batch = packing.PackedCollator(pad_id=0)([item])
    assert batch["input_ids"].shape[0] == 1  # one row holds all six samples
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                      attention_mask=torch.ones_like(batch["input_ids"])).logits[0]
    row = batch["input_ids"][0].tolist()
    pos = batch["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    later_differs = False
    for a, b in zip(starts, starts[1:]):
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([row[a:b]])).logits[0]
        torch.testing.assert_close(packed[a:b], alone, atol=1e-4, rtol=1e-4)
        if a > 0:
            later_differs |= not torch.allclose(leaky[a:b], alone, atol=1e-4)
    assert later_differs, "with an all-ones attention_mask packed samples should leak into each other"


def test_supervised_only_loss_equals_the_full_sequence_loss(tiny_gemma):
    """Cutting the output layer to the supervised positions changes the work, not the number:
    the loss (and the gradient it gives) equals the model's own full-logits loss, sample by sample."""
    import torch

    model = _model(tiny_gemma)
    enc = _encoded([12, 30, 8, 17], reply=5, seed=3)
    item = packing.pack_examples(enc, batch_tokens=1000, seed=0)[0]
    batch = packing.PackedCollator(pad_id=0)([item])
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], logits_to_keep=batch["logits_to_keep"])
    assert out.logits.shape[0] == int(batch["logits_to_keep"].sum()) == 20
    loss = packing.supervised_loss(out, batch["labels"])
    loss.backward()
    grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()

    total, n = 0.0, 0
    for e in enc:
        ref = model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels]))
        k = sum(1 for x in e.labels[1:] if x != -100)
        (ref.loss * k / 20).backward()
        total += ref.loss.item() * k
        n += k
    torch.testing.assert_close(float(loss), total / n, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, model.model.layers[0].self_attn.q_proj.weight.grad, atol=1e-5, rtol=1e-4)


def test_loss_sums_matches_per_sample_evaluation(tiny_gemma):
    import torch

    model = _model(tiny_gemma)
    enc = _encoded([40, 7, 25, 60, 33, 9, 18] * 3, reply=6, seed=5)
    total, n = packing.loss_sums(model, enc, batch_tokens=128)
    ref, m = 0.0, 0
    with torch.no_grad():
        for e in enc:
            out = model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels]))
            k = sum(1 for x in e.labels[1:] if x != -100)
            ref += float(out.loss) * k
            m += k
    assert n == m
    assert abs(total - ref) / ref < 1e-5


def test_small_data_gets_smaller_packs_and_a_linearly_scaled_rate():
    assert packing.step_tokens(100_000, 1024) == 1024  # plenty of data: the full budget
    assert packing.step_tokens(32 * 300, 1024) == 300  # keeps MIN_STEPS_PER_EPOCH (32) steps
    assert packing.step_tokens(40, 1024) == 1  # a handful of samples: one per step
    assert packing.scaled_learning_rate(3e-4, 4.5) == pytest.approx(1.35e-3)
    assert packing.scaled_learning_rate(3e-4, 0.5) == 3e-4  # never below the one-sample rate


def test_packed_training_gives_the_adapter_of_padded_batches(tiny_gemma, tmp_path, monkeypatch):
    """One optimizer step over the same samples, packed into one padding-free row or padded one
    sample per row, moves the LoRA weights the same way: packing changes the speed, not the result."""
    from safetensors.torch import load_file

    import train
    from models import TrainConfig
    from parser import build_samples
    from models import Turn

    dialog = [Turn(speaker="A" if i % 2 else "B", content=f"повідомлення {i} " * (1 + i % 4)) for i in range(24)]
    samples, _ = build_samples(dialog, "A", 3)
    monkeypatch.setattr(packing, "MIN_STEPS_PER_EPOCH", 1)  # all samples in one packed step
    base = dict(base_model=str(tiny_gemma), load_in_8bit=False, device="cpu", epochs=1, learning_rate=1e-2,
                max_steps=None, max_seq_length=256, seed=0, lora_dropout=0.0)
    packed = train.train_lora(samples, "A", TrainConfig(**base, batch_size=1, batch_tokens=100_000), tmp_path / "p", tmp_path)
    # without packing the rate is used as given: give it the packed step's √k-scaled rate
    padded_config = TrainConfig(**{**base, "learning_rate": packing.scaled_learning_rate(1e-2, len(samples))},
                                batch_size=len(samples), batch_tokens=0)
    padded = train.train_lora(samples, "A", padded_config, tmp_path / "s", tmp_path)
    assert packed.info["steps"] == padded.info["steps"] == 1
    assert packed.info["learning_rate_effective"] == padded.info["learning_rate_effective"]
    assert packed.info["packed_sequences"] == 1 and padded.info["packed_sequences"] == len(samples)
    a = load_file(str(packed.model_path / "adapter_model.safetensors"))
    b = load_file(str(padded.model_path / "adapter_model.safetensors"))
    assert max(a[k].abs().max().item() for k in a) > 1e-3
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
