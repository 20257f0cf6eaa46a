"""The preference objective: each reply preferred over another participant's line, with the base as
reference (lm/preference.py), packed beside the samples (lm/packing.py) and trained by train_lora."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
import torch

import train
from config import Settings
from lm import base_model, chat_format, packing, preference
from lm.chat_format import Encoded
from models import Sample, TrainRequest, Turn
from parser import build_samples


def sample(i, context, reply):
    return Sample(id=f"s{i}", context=[Turn(speaker=s, content=c) for s, c in context], reply=reply,
                  added_at=datetime.now(timezone.utc))


def test_a_negative_is_another_participants_line_of_about_the_replys_length_never_in_its_own_context():
    samples = [
        sample(0, [("Ann", "short one"), ("Bob", "a much much longer line than the others here")], "two words"),
        sample(1, [("Ann", "yes"), ("Bob", "tiny bit")], "a much longer reply of nine words in it"),
        sample(2, [("Ann", "three words here")], "ok then"),
    ]
    lines = preference.negatives(samples, "Me", seed=0)
    others = {t.content for s in samples for t in s.context}
    for s, line in zip(samples, lines):
        assert line in others and line not in {t.content for t in s.context}
    assert len(lines[1].split()) >= 5  # the long reply gets the long line
    assert lines == preference.negatives(samples, "Me", seed=0)  # deterministic
    # the person's own lines, and lines equal to any of the person's replies, are never negatives
    own = [sample(0, [("Me", "mine"), ("Ann", "ok then")], "hello"), sample(1, [("Ann", "hi")], "ok then")]
    assert preference.negatives(own, "Me", seed=1) == ["hi", None]  # "hi" is in s1's own context, "ok then" a reply
    assert preference.negatives([sample(0, [("Me", "alone")], "still alone")], "Me", seed=0) == [None]


def test_per_token_linear_cross_entropy_gives_each_terms_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(9, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 16, dtype=torch.float64)
    targets = torch.randint(0, 40, (9,))
    scale = torch.randn(9, dtype=torch.float64)
    losses = packing.linear_cross_entropy(hidden, weight, targets, chunk=4, softcap=20.0, per_token=True)
    (losses * scale).sum().backward()
    ref_hidden = hidden.detach().clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(torch.tanh(ref_hidden @ weight.T / 20.0) * 20.0, targets, reduction="none")
    (ref * scale).sum().backward()
    torch.testing.assert_close(losses.double(), ref, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, rtol=1e-6, atol=1e-9)


def _line(n, reply, seed):
    g = torch.Generator().manual_seed(seed)
    ids = [2] + torch.randint(6, 300, (n - 1,), generator=g).tolist()
    return Encoded(ids, [-100] * (n - reply) + ids[n - reply:])


def _pairs_data():
    enc = [_line(n, 4, i) for i, n in enumerate([20, 14, 30, 9, 25])]
    pairs = [preference.Pair(_line(10, 3, 10 + i), _line(11, 5, 20 + i), (-1.0 * i, -2.0 * i)) if i != 2 else None
             for i in range(5)]
    return enc, pairs


def test_a_pair_is_packed_with_its_own_sample_and_only_the_samples_tokens_count_for_sft():
    enc, pairs = _pairs_data()
    items = packing.pack_examples(enc, 60, seed=0, row_tokens=32, pairs=pairs)
    seen = []
    for item in items:
        for i in item["pair_index"]:
            assert pairs[i] is not None
        seen += item["pair_index"]
        batch = packing.PackedCollator(pad_id=0)([item])
        sft = int(batch["sft"].sum())
        # every pack has SFT tokens: a pair travels with its sample
        assert sft > 0 and int((batch["labels"] != -100).sum()) == sft
        assert batch["refs"].shape == (len(item["pair_index"]), 2)
        for k, i in enumerate(item["pair_index"]):
            assert batch["refs"][k].tolist() == list(pairs[i].ref)
            assert int((batch["seq"] == 2 * k).sum()) == pairs[i].chosen.supervised - (pairs[i].chosen.labels[0] != -100)
            assert int((batch["seq"] == 2 * k + 1).sum()) == pairs[i].rejected.supervised
    assert sorted(seen) == [0, 1, 3, 4]
    # without pairs the items are exactly as before
    assert packing.pack_examples(enc, 60, seed=0, row_tokens=32) == [
        {k: v for k, v in item.items() if k in ("input_ids", "labels", "position_ids")}
        for item in packing.pack_examples(enc, 60, seed=0, row_tokens=32, pairs=[None] * 5)]


@pytest.mark.parametrize("fused", [True, False])
def test_pair_log_likelihoods_are_each_lines_own_and_the_loss_is_sft_plus_the_dpo_term(tiny_gemma, fused, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(packing, "FUSED_LOSS", fused)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_gemma)).eval()
    enc, pairs = _pairs_data()
    preference.reference_logps(model, pairs)
    for p in filter(None, pairs):  # each line alone, by the plain per-sample loss
        for line, ref in ((p.chosen, p.ref[0]), (p.rejected, p.ref[1])):
            total, _ = packing.loss_sums(model, [line])
            assert ref == pytest.approx(-total, rel=1e-4)
    batch = packing.PackedCollator(pad_id=0)(packing.pack_examples(enc, 1000, seed=0, pairs=pairs))
    objective = preference.Objective(weight=0.5, beta=0.1)
    with torch.no_grad():
        plain = packing.PackedCollator(pad_id=0)(packing.pack_examples(enc, 1000, seed=0))
        sft = float(packing.packed_loss(model, plain))
        both = float(packing.packed_loss(model, batch, preference=objective))
    # the model is its own reference here: every margin is 0 and each pair's DPO loss is log 2
    assert both == pytest.approx(sft + 0.5 * torch.log(torch.tensor(2.0)).item(), rel=1e-4)
    assert preference.summary(objective.stats)["margin"] == pytest.approx(0.0, abs=1e-3)


def _config(base, **settings):
    s = Settings(BASE_MODEL=str(base), DEVICE="cpu", LOAD_IN_8BIT=False, **settings)
    return train.resolve_config(s, TrainRequest(speaker="Me", epochs=4))


def _dialog():
    """Me answers Ann in one voice; Bob says other things in another."""
    turns = []
    for i in range(24):
        turns += [Turn(speaker="Ann", content=f"what about number {i}?"),
                  Turn(speaker="Me", content=f"yes yes {i} 🌻 yes"),
                  Turn(speaker="Bob", content=f"no, never {i}, absolutely not")]
    return turns


@pytest.mark.parametrize("batch_tokens", [None, 0])
def test_training_with_the_preference_prefers_the_persons_lines_over_the_others(tiny_gemma, tmp_path, batch_tokens):
    samples, _ = build_samples(_dialog(), "Me", 2)
    config = _config(tiny_gemma, PREFERENCE_WEIGHT=2.0, PREFERENCE_BETA=0.5)
    if batch_tokens is not None:
        config = config.model_copy(update={"batch_tokens": batch_tokens})
    out = train.train_lora(samples, "Me", config, tmp_path / "out", tmp_path / "models")
    term = out.info["preference"]
    assert term["pairs"] == out.info["num_samples"] - out.info["num_heldout"]
    assert term["margin"] > 0 and term["accuracy"] > 0.5  # the adapter prefers the person's reply more than the base
    assert (out.model_path / "adapter_model.safetensors").exists()


def test_without_weight_or_other_voices_there_are_no_pairs_and_training_is_sft(tiny_gemma, tmp_path):
    samples, _ = build_samples(_dialog(), "Me", 2)
    out = train.train_lora(samples, "Me", _config(tiny_gemma, PREFERENCE_WEIGHT=0.0), tmp_path / "a", tmp_path / "models")
    assert "preference" not in out.info
    alone = [Turn(speaker="Me", content=f"line {i}") for i in range(12)]
    solo, _ = build_samples(alone, "Me", 2)
    out = train.train_lora(solo, "Me", _config(tiny_gemma, PREFERENCE_WEIGHT=1.0), tmp_path / "b", tmp_path / "models")
    assert "preference" not in out.info  # nobody else's lines to prefer over


def test_the_preference_settings_are_resolved_and_checked(tiny_gemma):
    default = _config(tiny_gemma)
    assert (default.preference_weight, default.preference_beta, default.preference_context_turns) == (0.0, 0.1, 2)
    with pytest.raises(ValueError):
        Settings(PREFERENCE_WEIGHT=-1)
    with pytest.raises(ValueError):
        Settings(PREFERENCE_BETA=0)
