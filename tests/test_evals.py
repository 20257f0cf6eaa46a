"""Evaluation: held-out split, losses of base and adapter on the same tokens, style metrics, report."""

from __future__ import annotations

import json

import train
from config import Settings
from lm import evals
from lm.infer import Decoding, PersonaEngine
from models import TrainRequest, Turn
from parser import build_samples

PHRASE = "ось так 🌻!"


def styled_dialog(n: int, speaker: str = "Ann") -> list[Turn]:
    dialog = []
    for i in range(n):
        dialog += [Turn(speaker="Q", content=f"що ти думаєш про число {i}?"), Turn(speaker=speaker, content=f"число {i} {PHRASE}")]
    return dialog


def test_holdout_is_deterministic_and_never_trained_on():
    samples, _ = build_samples(styled_dialog(40), "Ann", 2)
    train_part, held = train.holdout_split(samples, 0.1, 10)
    assert len(held) >= 1 and len(train_part) + len(held) == 40
    assert {s.id for s in train_part}.isdisjoint({s.id for s in held})
    # Chosen by sample id, not position: the same samples whatever the order.
    assert {s.id for s in train.holdout_split(list(reversed(samples)), 0.1, 10)[1]} == {s.id for s in held}
    assert train.holdout_split(samples[:9], 0.1, 10) == (samples[:9], [])


def test_style_metrics():
    assert evals.style(["Привіт, світе! 😊"]) == {"mean_words": 2.0, "emoji_per_100_chars": 6.25, "punctuation_per_100_chars": 12.5}
    assert evals.vocabulary_overlap(["так ні"], ["так"]) == 0.5
    assert evals.style_distance(["a b!"], ["a b!"]) == 0.0
    assert evals.style_distance(["zzz"], ["a b! 😊"]) > 1.5


def test_an_adapter_worse_than_its_base_is_said_in_words():
    report = {"held_out": {"base": {"loss": 3.4642}, "adapter": {"loss": 4.1631}}}
    assert evals.warnings(report) == [
        "the adapter's held-out loss is worse than the base model's (3.464 → 4.163): it predicts this person's unseen "
        "replies less well than no training at all; train on more data, for fewer epochs or with a lower learning rate"]
    assert evals.warnings({"held_out": {"base": {"loss": 4.1}, "adapter": {"loss": 3.4}}}) == []
    assert evals.warnings({"note": "too few samples to hold any out"}) == []


def test_report_shows_the_adapter_learned_the_speaker(tiny_gemma, tmp_path):
    samples, _ = build_samples(styled_dialog(30), "Ann", 2)
    other, _ = build_samples(styled_dialog(5, "Bob"), "Bob", 2)
    settings = Settings(BASE_MODEL=str(tiny_gemma), DEVICE="cpu", LOAD_IN_8BIT=False)
    config = train.resolve_config(settings, TrainRequest(speaker="Ann", epochs=8, learning_rate=0.01))
    out = train.train_lora(samples, "Ann", config, tmp_path / "out", tmp_path / "models")
    held_ids = set(out.info["heldout_ids"])
    assert out.info["num_heldout"] == len(held_ids) >= 1 and out.info["num_samples_used"] == 30 - len(held_ids)
    held = [s for s in samples if s.id in held_ids]

    engine = PersonaEngine(str(tiny_gemma), tmp_path / "models", tmp_path / "out", "cpu", False, 2)
    with engine.session("Ann") as (model, tokenizer, template):
        report = evals.evaluate(model, tokenizer, template, "Ann", held, {"Bob": other}, 512, generations=2,
                                decoding=Decoding(max_new_tokens=12))
    base, adapter = report["held_out"]["base"], report["held_out"]["adapter"]
    assert base["tokens"] == adapter["tokens"] > 0  # the same tokens for both
    assert adapter["loss"] < base["loss"] and report["held_out"]["loss_reduction"] > 0
    assert report["specificity"]["others"] == ["Bob"]
    assert report["warnings"] == []  # better than the base: nothing to warn of
    assert set(report["style"]) == {"true", "base", "adapter"}
    assert len(report["samples"]) == 2 and report["samples"][0]["true"].endswith(PHRASE)

    evals.write_report(out.model_path, report, out.info)
    assert json.loads((out.model_path / "eval.json").read_text())["held_out"]["adapter"]["loss"] == adapter["loss"]
    assert (out.model_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_holdout_for_few_samples(tiny_gemma, tmp_path):
    engine = PersonaEngine(str(tiny_gemma), tmp_path, tmp_path, "cpu", False, 1)
    with engine.session(None) as (model, tokenizer, template):
        report = evals.evaluate(model, tokenizer, template, "Ann", [], {}, 512)
    assert report["held_out_samples"] == 0 and "too few samples" in report["note"]


def test_loops_are_caught_and_ordinary_replies_are_not():
    assert evals.looping("Oh, I'm so sorry. I'm sorry. I'm sorry. I'm sorry.")
    assert evals.looping("I-I said you had a-I-I-I-I-I-I-I")
    assert evals.looping("I'm trying to get a football phone. I'm trying to get a football phone. I'm trying to get a football phone.")
    assert not evals.looping("I'm sorry. I really am sorry, dear.")
    assert not evals.looping("")
    assert evals.distinct_2(["a b a b a b"]) == 0.4  # 2 distinct of 5 bigrams
    assert evals.distinct_2(["so it goes", "and so on"]) == 1.0


def test_generation_figures_are_what_a_user_sees():
    from lm.infer import Generation

    replies = [Generation("Yes, of course.", 5, 4, "stop"), Generation("no no no no no no no no", 5, 64, "length"),
               Generation("Quite so.", 5, 3, "stop"), Generation("I am sorry. I am sorry. I am sorry.", 5, 12, "stop")]
    true = ["Yes.", "Certainly not, Algernon.", "Quite.", "I am not."]
    figures = evals.generation_figures(replies, true)
    assert figures["ends_turn"] == 0.75 and figures["loops"] == 0.5
    # words per reply 3, 8, 2, 9 (median 5.5) against the person's 1, 3, 1, 3 (median 2)
    assert (figures["median_words"], figures["person_median_words"]) == (5.5, 2.0) and figures["length_ratio"] == 2.75
    assert 0 < figures["distinct_2"] < 1 and figures["style_distance"] > 0


def trained_and_evaluated(tiny_gemma, tmp_path, generations: int, steps: int):
    """Ann's adapter of the tiny model after `steps` steps, evaluated as a job evaluates it."""
    samples, _ = build_samples(styled_dialog(20), "Ann", 2)
    settings = Settings(BASE_MODEL=str(tiny_gemma), DEVICE="cpu", LOAD_IN_8BIT=False, EVAL_GENERATIONS=generations)
    config = train.resolve_config(settings, TrainRequest(speaker="Ann", max_steps=steps))
    out = train.train_lora(samples, "Ann", config, tmp_path / "out", tmp_path / "models",
                           evaluate=evals.after_training(settings, "Ann", config))
    return settings, out


def test_report_leads_with_generation_figures_and_end_of_turn(tiny_gemma, tmp_path):
    settings, out = trained_and_evaluated(tiny_gemma, tmp_path, generations=3, steps=2)
    report = out.evaluation
    assert list(report)[:5] == ["speaker", "created_at", "base_weights", "held_out_samples", "generation"]
    generation = report["generation"]
    assert generation["contexts"] == 2 and generation["decoding"]["temperature"] == settings.GENERATION_TEMPERATURE
    for label in ("base", "adapter"):
        assert 0 <= generation[label]["ends_turn"] <= 1 and 0 <= generation[label]["loops"] <= 1
        assert 0 < report["end_of_turn"][label] < 1
    # Written into the adapter folder with it, from the model still in memory.
    assert json.loads((out.model_path / "eval.json").read_text())["generation"] == generation
    assert {s["adapter_finish"] for s in report["samples"]} <= {"stop", "length"}


def test_no_generations_means_no_generation_or_style_figures(tiny_gemma, tmp_path):
    """EVAL_GENERATIONS=0 skips generating: the report has losses but no style distance of zero replies
    (it said 1.0, as if the replies were as far from the person as can be)."""
    _, out = trained_and_evaluated(tiny_gemma, tmp_path, generations=0, steps=1)
    report = out.evaluation
    assert report["held_out"]["adapter"]["loss"] > 0 and report["samples"] == []
    assert "generation" not in report and "style" not in report
    evals.write_report(out.model_path, report, out.info)  # the plot and summary do without them
    assert "style" not in json.loads((out.model_path / "eval.json").read_text())
