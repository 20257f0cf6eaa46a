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
    assert list(report)[:6] == ["speaker", "created_at", "base_weights", "held_out_samples", "judge", "generation"]
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


# --- the judge of style ---------------------------------------------------------------------------------

TOPICS = ["кава", "погода", "робота", "кіно", "море", "книжка", "концерт", "потяг", "суп", "футбол", "сад", "кіт"]


def casual(i: int) -> str:
    """Ann writes short, lowercase, with emoji and 'лол'."""
    return f"{TOPICS[i % 12]} {TOPICS[(i // 12) % 12]} лол 😂😂" if i % 2 else f"ага {TOPICS[i % 12]} і {TOPICS[(i // 12) % 12]} топ 🔥"


def formal(i: int) -> str:
    """Bob writes whole sentences, capitalised, with commas and no emoji."""
    return f"Шановна, щодо теми «{TOPICS[i % 12].capitalize()}» і {TOPICS[(i // 12) % 12]}, я вважаю, що це питання потребує уваги."


def voices_dialog(n: int) -> list[Turn]:
    return [turn for i in range(n) for turn in (Turn(speaker="Bob", content=formal(i)), Turn(speaker="Ann", content=casual(i)))]


def test_the_judge_tells_two_voices_apart_and_names_the_persona():
    from lm import judge

    samples, _ = build_samples(voices_dialog(40), "Ann", 2)
    train_part, held = train.holdout_split(samples, 0.2, 10)
    messages = judge.training_messages("Ann", train_part, {}, [s.reply for s in held])
    names = {name for name, _ in messages}
    assert names == {"Ann", "Bob"}  # the others' turns come from the contexts
    assert not {judge._key(s.reply) for s in held} & {judge._key(t) for _, t in messages}  # no held-out line trained on
    block = judge.judge("Ann", messages, [s.reply for s in held], adapter=[casual(101), casual(102), formal(103)],
                        base=[formal(104), formal(105)])
    assert block["ceiling"] == 1.0  # her real held-out lines are hers
    assert block["adapter"] == round(2 / 3, 4) and block["base"] == 0.0
    assert block["chance"] == 0.5 and block["classes"] == ["Ann", "Bob"]
    assert block["train_messages"]["Ann"] == len(train_part) and block["train_messages"]["Bob"] >= 30
    assert block["text"] == "sounds like Ann: 67% of the persona's replies, 0% of the base model's; 100% of Ann's real held-out messages (chance 50%)"


def test_the_judge_says_why_when_there_is_one_voice_or_too_few():
    from lm import judge

    alone = [("Ann", casual(i)) for i in range(20)]
    block = judge.judge("Ann", alone, [casual(50)], [casual(51)], [casual(52)])
    assert "ceiling" not in block and block["classes"] == ["Ann"] and "only Ann's voice" in block["note"]
    few = judge.judge("Ann", alone[:3] + [("Bob", formal(i)) for i in range(20)], [casual(50)])
    assert "Ann has 3 real messages" in few["note"] and "ceiling" not in few
    # Other stored speakers join when the person's conversations hold too few other voices.
    samples, _ = build_samples(styled_dialog(12), "Ann", 2)
    others, _ = build_samples(voices_dialog(12), "Bob", 2)
    assert {n for n, _ in judge.training_messages("Ann", samples, {"Bob": others})} == {"Ann", "Q", "Bob"}


def test_every_report_leads_with_the_judge(tiny_gemma, tmp_path):
    samples, _ = build_samples(voices_dialog(30), "Ann", 2)
    settings = Settings(BASE_MODEL=str(tiny_gemma), DEVICE="cpu", LOAD_IN_8BIT=False, EVAL_GENERATIONS=3)
    config = train.resolve_config(settings, TrainRequest(speaker="Ann", max_steps=2))
    out = train.train_lora(samples, "Ann", config, tmp_path / "out", tmp_path / "models",
                           evaluate=evals.after_training(settings, "Ann", config))
    report = out.evaluation
    assert list(report)[4] == "judge"
    block = report["judge"]
    assert block["classes"] == ["Ann", "Bob"] and block["chance"] == 0.5
    assert block["ceiling"] == 1.0 and 0 <= block["adapter"] <= 1 and 0 <= block["base"] <= 1
    assert block["real_messages"] == report["held_out_samples"] and block["generated"] == 3
    assert block["text"].startswith("sounds like Ann: ")
    assert evals.summary(report)["judge"] == block  # the job's result has it
    assert json.loads((out.model_path / "eval.json").read_text())["judge"] == block


def test_a_persona_that_does_not_sound_like_the_person_is_said_in_words():
    report = {"speaker": "Ann", "judge": {"adapter": 0.25, "base": 0.375, "ceiling": 0.8}}
    assert evals.warnings(report) == [
        "the judge of style names Ann in no more of the persona's replies than of the base model's (25% against 38%): "
        "the adapter does not yet sound like this person"]
    assert evals.warnings({"speaker": "Ann", "judge": {"adapter": 0.5, "base": 0.25}}) == []
    assert evals.warnings({"speaker": "Ann", "judge": {"note": "no judge of style: ..."}}) == []


def test_an_adapter_whose_best_pass_is_still_worse_says_so():
    report = {"speaker": "Ann", "held_out": {"base": {"loss": 3.4642}, "adapter": {"loss": 3.6}},
              "passes": {"held_out_loss": [3.46, 3.6, 3.9, 4.16], "kept": 1, "stopped_early": True, "patience": 2}}
    assert evals.warnings(report)[0].startswith(
        "even the best of its 3 passes (pass 1, kept) is worse than the base model's (3.464 → 3.600): it predicts")
