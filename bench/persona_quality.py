"""Persona quality on real multi-party dialogue: does each adapter sound like its person?

    python bench/persona_quality.py                         # Earnest: Jack, Algernon, Cecily
    python bench/persona_quality.py --characters Jack Cecily --max-samples 40    # a quick look

The play (bench/data/, public domain) is stored through the service's own code (parser), one file
per character, exactly as /upload-text stores it; each character's adapter is trained with the
service's defaults (settings and TrainRequest defaults, nothing overridden) on the real default
model and evaluated as a job evaluates it (eval.json). Reported per character: what a user sees of
the replies generated for held-out contexts (share that end their turn, share caught in a loop,
median length against the person's, distinct-2, style distance against the base's) and the
held-out loss against the base's; and for all characters together the **attribution accuracy**:
for every held-out line, the character whose adapter lowers its loss most below the base's,
against the true one (chance = 1/characters), and each adapter's mean gain on each character's
lines (an adapter that learnt its person gains most on that person's lines); and the **judge of
style** over all characters (lm/judge.py's classifier trained on their training-split lines): the
share of each character's real held-out lines it names right (its ceiling), of its adapter's
generated replies and of the base's, with the issue's targets checked.

Writes bench/results/persona_quality.json and prints a table. Minutes per character on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PLAY = ROOT / "bench" / "data" / "importance_of_being_earnest.json"


def per_sample_losses(engine, speaker, samples, who_of, max_len):
    """{sample id: mean NLL per reply token} under `speaker`'s adapter (None: the base), each sample
    formatted from its true speaker's side (`who_of[id]`), so every model scores the same tokens."""
    from lm import chat_format, packing

    out = {}
    with engine.session(speaker) as (model, tokenizer, template):
        for s in samples:
            encoded = chat_format.encode_all([s], who_of[s.id], tokenizer, template, max_len)
            if encoded:
                total, tokens = packing.loss_sums(model, encoded)
                out[s.id] = total / tokens
    return out


def main() -> int:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--play", type=Path, default=PLAY)
    cli.add_argument("--characters", nargs="+", default=["Jack", "Algernon", "Cecily"])
    cli.add_argument("--max-samples", type=int, default=0, help="train on at most this many samples per character (0: all)")
    cli.add_argument("--models-dir", type=Path, default=ROOT / "models", help="where the default model is provisioned")
    cli.add_argument("--work", type=Path, default=ROOT / "bench" / "results" / "persona_quality")
    cli.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "persona_quality.json")
    cli.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                     help="settings to override (an experiment, e.g. LEARNING_RATE=5e-4); none for the defaults")
    cli.add_argument("--reuse", action="store_true",
                     help="keep --work and do not retrain a character whose adapter and eval.json are there "
                          "(an interrupted run goes on; attribution of adapters already trained)")
    ns = cli.parse_args()

    import logging
    import os
    import shutil

    logging.basicConfig(level=logging.WARNING)
    work = ns.work
    if not ns.reuse:
        shutil.rmtree(work, ignore_errors=True)
    overrides = dict(item.split("=", 1) for item in ns.set)
    os.environ.update({"DATA_DIR": str(work / "data"), "OUTPUT_DIR": str(work / "output_lora"),
                       "MODELS_DIR": str(ns.models_dir), "DEVICE": "cpu", **overrides})
    os.environ.pop("BASE_MODEL", None)  # the offline default

    import parser as dialog_parser
    import store
    import train
    from config import get_settings
    from lm import evals
    from lm.infer import PersonaEngine
    from models import TrainRequest, Turn

    settings = get_settings()
    play = json.loads(ns.play.read_text(encoding="utf-8"))
    scenes = [[Turn(speaker=t["speaker"], content=t["content"]) for t in scene] for scene in play["scenes"]]
    for who in ns.characters:
        if ns.reuse and store.speaker_file(settings.DATA_DIR, who).exists():
            continue
        samples = [s for scene in scenes for s in dialog_parser.build_samples(scene, who, settings.MAX_CONTEXT_TURNS)[0]]
        store.append_samples(settings.DATA_DIR, who, samples[: ns.max_samples or None])

    results: dict = {"play": play["title"], "characters": {}, "settings_overridden": overrides,
                     "command": " ".join(sys.argv)}
    held_out: dict[str, list] = {}
    for who in ns.characters:
        stored = store.load_speaker(settings.DATA_DIR, who)
        config = train.resolve_config(settings, TrainRequest(speaker=who))
        started = time.monotonic()
        done = settings.OUTPUT_DIR / who
        if ns.reuse and (done / "eval.json").exists() and (done / "training_info.json").exists():
            report, info = (json.loads((done / name).read_text(encoding="utf-8")) for name in ("eval.json", "training_info.json"))
        else:
            outcome = train.train_lora(stored.messages, who, config, settings.OUTPUT_DIR, settings.MODELS_DIR,
                                       evaluate=evals.after_training(settings, who, config))
            report, info = outcome.evaluation, outcome.info
        held_ids = set(info["heldout_ids"])
        held_out[who] = [s for s in stored.messages if s.id in held_ids]
        held = report["held_out"]
        results["characters"][who] = {
            "samples": info["num_samples"], "held_out": info["num_heldout"], "steps": info["steps"],
            "epochs": info["config"]["epochs"], "train_runtime_s": info["train_runtime_s"],
            "wall_s": round(time.monotonic() - started, 1),
            "generation": report.get("generation"),
            "held_out_loss": {"base": held["base"]["loss"], "adapter": held["adapter"]["loss"],
                              "ratio": round(held["adapter"]["loss"] / held["base"]["loss"], 3)},
            "end_of_turn_probability": report.get("end_of_turn"),
            "specificity_margin": (report.get("specificity") or {}).get("margin"),
            "examples": report["samples"][:3],
            "all_replies": {k: [x[k] for x in report["samples"]] for k in ("adapter", "base")},
            "preference": info.get("preference"),
        }
        print(f"{who}: trained {info['steps']} steps in {info['train_runtime_s']:.0f} s; held-out loss "
              f"{json.dumps(results['characters'][who]['held_out_loss'])}; "
              f"{json.dumps(results['characters'][who]['generation'])}", flush=True)

    # Attribution: which adapter explains each held-out line best, relative to the base.
    engine = PersonaEngine(settings.BASE_MODEL, settings.MODELS_DIR, settings.OUTPUT_DIR, "cpu", False, len(ns.characters))
    lines = [(who, s) for who, samples in held_out.items() for s in samples]
    who_of = {s.id: who for who, s in lines}
    samples = [s for _, s in lines]
    base = per_sample_losses(engine, None, samples, who_of, settings.MAX_SEQ_LENGTH)
    gains = {c: {k: base[k] - v for k, v in per_sample_losses(engine, c, samples, who_of, settings.MAX_SEQ_LENGTH).items()}
             for c in ns.characters}
    right = [max(ns.characters, key=lambda c: gains[c][s.id]) == who for who, s in lines if s.id in base]
    per_character = {c: round(sum(r for (who, _), r in zip(lines, right) if who == c) /
                              max(1, sum(1 for who, _ in lines if who == c)), 3) for c in ns.characters}
    # Whether an adapter learnt its person or the play: its mean gain on each character's lines.
    mean_gain = {c: {w: round(sum(gains[c][s.id] for who, s in lines if who == w and s.id in gains[c]) /
                              max(1, sum(1 for who, s in lines if who == w and s.id in gains[c])), 3)
                     for w in ns.characters} for c in ns.characters}
    results["attribution"] = {"accuracy": round(sum(right) / len(right), 3), "chance": round(1 / len(ns.characters), 3),
                              "lines": len(right), "per_character": per_character, "mean_gain": mean_gain}

    # The judge of style over all characters: trained on their training-split lines, asked who said each
    # character's real held-out lines (its ceiling), its adapter's generated replies and the base's.
    from lm import judge

    train_lines = [(who, s.reply) for who in ns.characters for s in store.load_speaker(settings.DATA_DIR, who).messages
                   if s.id not in {h.id for h in held_out[who]}]
    clf = judge.classifier(train_lines, settings.SEED)
    share = lambda who, texts: round(sum(p == who for p in clf.predict(texts)) / len(texts), 3) if texts else None  # noqa: E731
    per = {}
    for who in ns.characters:
        replies = results["characters"][who]["all_replies"]
        per[who] = {"ceiling": share(who, [s.reply for s in held_out[who]]), "adapter": share(who, replies["adapter"]),
                    "base": share(who, replies["base"]), "generated": len(replies["adapter"])}
    mean = lambda key: round(sum(p[key] for p in per.values() if p[key] is not None) / len(per), 3)  # noqa: E731
    chance = round(1 / len(ns.characters), 3)
    overall = {"ceiling": mean("ceiling"), "adapter": mean("adapter"), "base": mean("base"), "chance": chance}
    gap = overall["ceiling"] - chance
    results["judge"] = {"per_character": per, **overall, "train_lines": len(train_lines),
                        "targets": {"adapter >= chance + gap/2": overall["adapter"] >= chance + gap / 2,
                                    "adapter - base >= gap/4": overall["adapter"] - overall["base"] >= gap / 4,
                                    "attribution >= ceiling": results["attribution"]["accuracy"] >= overall["ceiling"]}}

    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"\n{'character':<12} {'ends turn':>9} {'loops':>6} {'len/person':>10} {'distinct-2':>10} "
          f"{'style a/b':>10} {'loss a/b':>8} {'train s':>8}")
    for who, r in results["characters"].items():
        if not r["generation"]:  # EVAL_GENERATIONS=0
            print(f"{who:<12} {'':>49} {r['held_out_loss']['ratio']:>8.2f} {r['train_runtime_s']:>8.0f}")
            continue
        g = r["generation"]["adapter"]
        print(f"{who:<12} {g['ends_turn']:>9.0%} {g['loops']:>6.0%} {g['length_ratio']:>10.2f} {g['distinct_2']:>10.2f} "
              f"{g['style_distance']:>4.2f}/{r['generation']['base']['style_distance']:<4.2f} "
              f"{r['held_out_loss']['ratio']:>8.2f} {r['train_runtime_s']:>8.0f}")
    a = results["attribution"]
    print(f"attribution accuracy {a['accuracy']:.0%} over {a['lines']} held-out lines (chance {a['chance']:.0%}); "
          f"per character {a['per_character']}")
    for c, row in a["mean_gain"].items():
        print(f"  {c}'s adapter, mean gain over the base (nats/token) on the lines of {row}")
    j = results["judge"]
    print(f"judge of style over {len(ns.characters)} characters (chance {j['chance']:.0%}): ceiling {j['ceiling']:.0%}, "
          f"adapters' replies {j['adapter']:.0%}, base's {j['base']:.0%}; per character {j['per_character']}")
    print(f"targets: {j['targets']}")
    print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
