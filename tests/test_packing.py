"""Packed, padding-free batches: same numbers as one sample at a time, no attention across samples,
logits and loss on supervised positions only."""

from __future__ import annotations

import pytest

from lm import packing
from lm.chat_format import Encoded


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
    from models import TrainConfig, Turn
    from parser import build_samples

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


# --- the GPU path, checked on CPU tensors ---------------------------------------------------------


def _reference_collate(items, pad_id):
    """The collator as it was: a Python loop over rows (the vectorised one must equal it)."""
    import torch

    rows = [r for item in items for r in zip(item["input_ids"], item["labels"], item["position_ids"])]
    width = max(len(ids) for ids, _, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    position_ids = torch.arange(width).repeat(len(rows), 1)
    for r, (ids, lab, pos) in enumerate(rows):
        n = len(ids)
        input_ids[r, :n], labels[r, :n], position_ids[r, :n] = torch.tensor(ids), torch.tensor(lab), torch.tensor(pos)
        position_ids[r, n:] = torch.arange(width - n)
    return input_ids, labels, position_ids


@pytest.mark.parametrize("row_tokens", [16, 64, 4096])
def test_vectorised_collator_equals_the_row_loop(row_tokens):
    enc = _encoded([5, 40, 17, 33, 3, 64, 12, 12, 7, 28] * 3, reply=3, seed=7)
    items = packing.pack_examples(enc, batch_tokens=200, seed=0, row_tokens=row_tokens)
    collate = packing.PackedCollator(pad_id=1)
    for group in (items[:1], items[:3]):  # one pack per step, or several
        batch = collate(group)
        input_ids, labels, position_ids = _reference_collate(group, pad_id=1)
        assert batch["input_ids"].equal(input_ids) and batch["labels"].equal(labels)
        assert batch["position_ids"].equal(position_ids)
        flat_labels = labels.flatten()
        assert batch["keep_index"].equal(batch["logits_to_keep"].flatten().nonzero().flatten())
        assert batch["targets"].equal(flat_labels[batch["keep_index"] + 1])
        assert (batch["targets"] != -100).all()
        assert batch["targets"].numel() == int((labels[:, 1:] != -100).sum())


def test_collator_pads_the_width_to_a_multiple():
    enc = _encoded([9, 14, 5], reply=2)
    batch = packing.PackedCollator(pad_id=0, pad_to_multiple_of=64)(packing.pack_examples(enc, 1000, 0))
    assert batch["input_ids"].shape == (1, 64)
    assert batch["position_ids"][0, 28:].tolist() == list(range(36))  # padding: a "sample" of its own
    assert batch["targets"].numel() == 6


def test_rows_are_device_dependent():
    assert packing.row_tokens_for("cpu", 4096) == packing.ROW_TOKENS
    assert packing.row_tokens_for("cuda:0", 4096) == packing.CUDA_ROW_TOKENS
    assert packing.row_tokens_for("cuda", 512) == 512  # one row per pack when the pack is short
    enc = _encoded([200] * 20, reply=10)
    assert len(packing.pack_examples(enc, 1000, 0, row_tokens=1000)[0]["input_ids"]) == 1
    assert len(packing.pack_examples(enc, 1000, 0, row_tokens=256)[0]["input_ids"]) == 5


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("chunk", [3, 1024])
def test_chunked_linear_cross_entropy_equals_the_plain_loss_and_gradient(chunk, softcap):
    import torch

    torch.manual_seed(0)
    hidden = torch.randn(10, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64)
    targets = torch.randint(0, 50, (10,))
    loss = packing.linear_cross_entropy(hidden, weight, targets, chunk=chunk, softcap=softcap)
    (2.5 * loss).backward()  # the upstream gradient scales the saved one
    ref_hidden = hidden.detach().clone().requires_grad_()
    logits = ref_hidden @ weight.T
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    ref = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    (2.5 * ref).backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, rtol=1e-6, atol=1e-9)
    with torch.no_grad():  # evaluation: no gradient is computed
        assert float(packing.linear_cross_entropy(hidden, weight, targets, chunk=chunk, softcap=softcap)) == pytest.approx(float(ref))
    with pytest.raises(ValueError):
        packing.linear_cross_entropy(hidden, weight.requires_grad_(), targets)


def _lora(path):
    from peft import LoraConfig, get_peft_model

    model = _model(path).train()
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM", init_lora_weights=False))


@pytest.mark.parametrize("arch", ["tiny_gemma", "tiny_llama"])
def test_fused_packed_loss_equals_full_logits_loss(arch, request, monkeypatch):
    """packed_loss (output layer and loss in chunks, at keep_index) gives the loss and the LoRA
    gradient of the model's own logits at the supervised positions, and leaves the output layer in
    place afterwards."""
    import torch

    model = _lora(request.getfixturevalue(arch))
    assert packing.fused_loss_supported(model)
    head = model.get_base_model().get_output_embeddings()
    monkeypatch.setattr(packing, "LOSS_CHUNK", 7)  # several chunks
    enc = _encoded([12, 30, 8, 17, 25], reply=5, seed=3)
    batch = packing.PackedCollator(pad_id=0)(packing.pack_examples(enc, 1000, seed=0, row_tokens=40))
    assert batch["input_ids"].shape[0] > 1
    grads = []
    for fused in (True, False):
        monkeypatch.setattr(packing, "FUSED_LOSS", fused)
        model.zero_grad()
        loss = packing.packed_loss(model, batch, num_items_in_batch=torch.tensor(50.0))
        loss.backward()
        grads.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        assert model.get_base_model().get_output_embeddings() is head
    (fused_loss, fused_grads), (plain_loss, plain_grads) = grads
    assert fused_loss == pytest.approx(plain_loss, rel=1e-6)
    assert len(fused_grads) == 8  # A and B of q_proj and v_proj, two layers
    for name, grad in fused_grads.items():
        assert grad.abs().max() > 0
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-6)


def test_fused_and_plain_training_give_the_same_adapter(tiny_gemma, tmp_path, monkeypatch):
    """A whole train_lora run, fused loss or full logits: the same adapter, the same losses."""
    from safetensors.torch import load_file

    import train
    from models import TrainConfig, Turn
    from parser import build_samples

    dialog = [Turn(speaker="A" if i % 2 else "B", content=f"повідомлення {i} " * (1 + i % 5)) for i in range(60)]
    samples, _ = build_samples(dialog, "A", 3)
    config = TrainConfig(base_model=str(tiny_gemma), load_in_8bit=False, device="cpu", epochs=1, learning_rate=1e-2,
                         max_steps=None, max_seq_length=256, seed=0, lora_dropout=0.0, batch_size=1, batch_tokens=200)
    monkeypatch.setattr(packing, "LOSS_CHUNK", 5)
    runs = []
    for fused in (True, False):
        monkeypatch.setattr(packing, "FUSED_LOSS", fused)
        runs.append(train.train_lora(samples, "A", config, tmp_path / str(fused), tmp_path))
    a, b = (load_file(str(r.model_path / "adapter_model.safetensors")) for r in runs)
    assert runs[0].info["steps"] > 3
    assert runs[0].info["loss_history"] == pytest.approx(runs[1].info["loss_history"], rel=1e-4)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
