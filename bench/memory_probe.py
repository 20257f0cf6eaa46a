"""Fact recall: does the persona say what the person actually said?

    python bench/memory_probe.py                    # the defaults (MEMORY_K), real default model
    python bench/memory_probe.py --set MEMORY_K=2   # an experiment

A synthetic person, Mira, chats with a friend: 24 facts of her life (her sister's city, her dog's
name, her job, her favourite dish, ...), each stated three times in other words, among a few hundred
ordinary messages (the dialog is made here from a fixed seed; nothing is downloaded). It is stored
through the service's own code (parser, store), trained with the service's defaults on the real
default model (the job's evaluation included), and then asked one question per fact, in words of
its own ("Which city does your sister live in these days?"), as /generate would be: once with the
memory the service recalls (MEMORY_K of her messages, from an index of everything stored) and once
without. A reply recalls the fact when it contains the fact's key word. Writes
bench/results/memory_probe.json and prints the table. About 15 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PERSON, FRIEND = "Mira", "Dana"
# (key word, three of Mira's lines stating the fact, each after the friend's line; the probe's question)
FACTS = [
    ("Lviv", [("how's your sister?", "my sister moved to Lviv last spring, she loves it"),
              ("any news from the family?", "visiting my sister in Lviv next month, finally"),
              ("is your sister happy there?", "Lviv suits my sister, all those coffee places")],
     "Which city does your sister live in these days?"),
    ("Biscuit", [("is that your dog barking?", "yes that's Biscuit, my beagle, he wants dinner"),
                 ("how was the walk?", "Biscuit pulled me through every puddle in the park"),
                 ("does the dog still steal socks?", "Biscuit ate another sock, the dog is a menace")],
     "What's your dog called again?"),
    ("tram", [("how was work?", "long night at the tram depot, two brakes to fix"),
              ("you look tired", "night shift again, I fix trams for a living, remember"),
              ("still at the same job?", "yes, my job at the tram depot pays better now")],
     "Remind me, what do you do for work?"),
    ("borscht", [("what's for dinner?", "borscht, my favourite thing to eat, always"),
                 ("you cooked again?", "made a huge pot of borscht, come over"),
                 ("what should I order?", "if they have borscht take it, I'd eat it every day")],
     "What's your favourite food?"),
    ("Skoda", [("how did you get here?", "drove the old Skoda, it barely started"),
               ("car trouble again?", "the Skoda needs new tyres, my poor car"),
               ("want a lift?", "no thanks, my red Skoda is parked outside")],
     "What car do you drive?"),
    ("cello", [("busy evening?", "cello practice, the neighbours hate it"),
               ("what's that case?", "my cello, I play in a small quartet"),
               ("concert soon?", "yes, I play the cello solo on Sunday")],
     "Which instrument do you play?"),
    ("Dynamo", [("did you watch the match?", "Dynamo won again, best team in the league"),
                ("football tonight?", "always, I support Dynamo since I was five"),
                ("sad about the score?", "Dynamo lost, my team broke my heart")],
     "Which football team do you support?"),
    ("dentist", [("how's your brother?", "my brother opened his own dentist practice"),
                 ("toothache, any advice?", "call my brother, he's a dentist, he'll see you"),
                 ("your brother still busy?", "he is, being a dentist means early mornings")],
     "What does your brother do?"),
    ("Odesa", [("miss home?", "I miss Odesa, my home town by the sea"),
               ("where is your accent from?", "Odesa, the whole town talks like that"),
               ("summer plans?", "back to Odesa, my home town, to see old friends")],
     "Which town are you from originally?"),
    ("peanut", [("want a snickers?", "no, I'm allergic to peanuts, sadly"),
                ("why no satay?", "peanut sauce, I'm allergic, remember"),
                ("careful with the cake", "thanks, if it has peanuts I can't, I'm allergic")],
     "What are you allergic to?"),
    ("Queen", [("what are you listening to?", "Queen, my favourite band forever"),
               ("concert tickets?", "a Queen tribute show, my favourite band's songs"),
               ("karaoke song?", "something by Queen, obviously")],
     "Who's your favourite band?"),
    ("Pixel", [("is the cat ok?", "Pixel is fine, my cat just sleeps all day"),
               ("what's that noise?", "Pixel knocked a cup off the table, silly cat"),
               ("who feeds the cat?", "my neighbour feeds Pixel when I'm away")],
     "What's your cat's name?"),
    ("Japanese", [("new hobby?", "learning Japanese, the language is so hard"),
                  ("why the flashcards?", "Japanese words, I practise the language every morning"),
                  ("trip plans?", "Tokyo one day, that's why I'm learning Japanese")],
     "What language are you learning?"),
    ("climbing", [("sore arms?", "climbing yesterday, my favourite sport"),
                  ("gym tonight?", "climbing gym, bouldering mostly"),
                  ("what do you do for sport?", "climbing, three evenings a week")],
     "What sport do you do?"),
    ("Tolkien", [("reading anything?", "Tolkien again, my favourite writer"),
                 ("what's that book?", "The Silmarillion, Tolkien is the best writer"),
                 ("gift ideas for you?", "anything by Tolkien, I collect his books")],
     "Who is your favourite writer?"),
    ("Shevchenko", [("what's your address?", "Shevchenko street 12, flat 4"),
                    ("is it a nice street?", "Shevchenko street is quiet, lots of trees"),
                    ("still living on the same street?", "yes, still on Shevchenko street")],
     "Which street do you live on?"),
    ("flat white", [("coffee?", "a flat white please, always a flat white"),
                    ("what do you drink in the morning?", "flat white, my coffee ritual"),
                    ("the usual coffee?", "yes, the flat white with oat milk")],
     "How do you take your coffee?"),
    ("Taras", [("how's your partner?", "Taras is great, my partner cooks tonight"),
               ("weekend with your partner?", "Taras and I are going hiking"),
               ("who was that on the phone?", "my partner Taras, he says hi")],
     "What's your partner's name?"),
    ("October", [("when's your birthday?", "October, the 14th, don't forget"),
                 ("party plans?", "my birthday in October, small party"),
                 ("autumn plans?", "my birthday is in October, so cake")],
     "When is your birthday?"),
    ("Amelie", [("movie night?", "Amelie again, my favourite film"),
                ("best film ever?", "Amelie, I know every scene of that film"),
                ("what are you watching?", "Amelie, for the tenth time")],
     "What's your favourite film?"),
    ("tomato", [("how's your mum?", "my mum grows tomatoes on the balcony"),
                ("what does your mum do all day?", "tomatoes, my mum talks to her tomato plants"),
                ("any gifts from your mum?", "a bag of her tomatoes, as always")],
     "What does your mum spend her time on?"),
    ("Lisbon", [("holiday plans?", "Lisbon in May, booked the holiday"),
                ("where are you flying?", "Lisbon, my holiday at last"),
                ("excited for the holiday?", "so excited, Lisbon here I come")],
     "Where are you going on holiday?"),
    ("Nokia", [("why didn't you answer?", "my old Nokia died, the phone is ancient"),
               ("new phone?", "no, still the Nokia, the phone never breaks"),
               ("can you get the app?", "not on my Nokia, my phone has no apps")],
     "What phone do you have?"),
    ("Boris", [("is that a cactus?", "that's Boris, my cactus, he's ten years old"),
               ("do you have plants?", "just Boris the cactus, he survives everything"),
               ("who's Boris?", "my cactus Boris, I talk to him")],
     "What's the name of your cactus?"),
]
SMALL_TALK = [
    ("hey, you around?", ["yes, just got home", "here, what's up", "kind of, on the bus", "yes, bored"]),
    ("how are you?", ["tired but fine", "good, busy week", "honestly exhausted", "not bad at all"]),
    ("what are you up to?", ["nothing much, tea and a blanket", "cleaning the flat, finally", "trying to nap",
                             "watching the rain"]),
    ("did you sleep well?", ["not really, the neighbours again", "like a stone", "woke up at five, no idea why",
                             "yes, ten hours"]),
    ("lunch?", ["yes please, I'm starving", "can't today, sorry", "only if it's quick", "sure, the usual place?"]),
    ("the weather is awful", ["I know, my umbrella broke", "typical, right", "at least it's warm", "I love this rain"]),
    ("see you tomorrow?", ["yes, around six", "maybe, I'll text you", "sure thing", "can we do Thursday instead?"]),
    ("that's so funny", ["haha I know", "right??", "I cried laughing", "stop it"]),
    ("are you free on Saturday?", ["morning yes, evening no", "totally free", "depends, what's the plan?",
                                   "no, family stuff"]),
    ("did you see the news?", ["no, tell me", "yes, crazy", "I stopped reading the news", "only the headlines"]),
    ("I'm so stressed", ["breathe, it'll be ok", "want to talk?", "same here honestly", "let's get a drink later"]),
    ("thanks for yesterday", ["any time", "it was fun", "thank you too", "we should do it again"]),
    ("good night", ["night!", "sleep well", "good night, talk tomorrow", "nighty night"]),
    ("what time is it there?", ["almost midnight", "just past noon", "no idea, my watch died", "late, too late"]),
    ("want to go for a walk?", ["give me ten minutes", "too cold for me", "yes, I need air", "after dinner?"]),
]
OPENERS = ["", "ok ", "hmm ", "well ", "oh ", "so ", "lol ", "ugh ", "yes "]
ENDINGS = ["", "!", " :)", "...", " haha", " honestly", " tbh", " 😅"]


def dialog(seed: int, small_talk: int) -> list[dict]:
    """Mira's chat: every fact's three lines and `small_talk` ordinary exchanges, in a shuffled order."""
    rng = random.Random(seed)
    exchanges = [pair for _, lines, _ in FACTS for pair in lines]
    for _ in range(small_talk):
        ask, replies = rng.choice(SMALL_TALK)
        exchanges.append((ask, rng.choice(OPENERS) + rng.choice(replies) + rng.choice(ENDINGS)))
    rng.shuffle(exchanges)
    return [{"speaker": who, "content": text} for ask, reply in exchanges for who, text in ((FRIEND, ask), (PERSON, reply))]


def main() -> int:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--small-talk", type=int, default=300, help="ordinary exchanges among the facts' lines")
    cli.add_argument("--seed", type=int, default=7)
    cli.add_argument("--models-dir", type=Path, default=ROOT / "models", help="where the default model is provisioned")
    cli.add_argument("--work", type=Path, default=ROOT / "bench" / "results" / "memory_probe")
    cli.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "memory_probe.json")
    cli.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="settings to override (an experiment)")
    cli.add_argument("--reuse", action="store_true", help="keep the adapter trained in --work; only ask again")
    ns = cli.parse_args()

    import logging
    import os
    import shutil

    logging.basicConfig(level=logging.WARNING)
    if not ns.reuse:
        shutil.rmtree(ns.work, ignore_errors=True)
    overrides = dict(item.split("=", 1) for item in ns.set)
    os.environ.update({"DATA_DIR": str(ns.work / "data"), "OUTPUT_DIR": str(ns.work / "output_lora"),
                       "MODELS_DIR": str(ns.models_dir), "DEVICE": "cpu", **overrides})
    os.environ.pop("BASE_MODEL", None)  # the offline default

    import memory
    import parser as dialog_parser
    import store
    import train
    from config import get_settings
    from lm import chat_format, evals
    from lm.infer import PersonaEngine, persona_decoding
    from models import TrainRequest, Turn

    settings = get_settings()
    turns = [Turn(**t) for t in dialog(ns.seed, ns.small_talk)]
    if not (ns.reuse and (settings.OUTPUT_DIR / PERSON / "training_info.json").exists()):
        samples, _ = dialog_parser.build_samples(turns, PERSON, settings.MAX_CONTEXT_TURNS)
        store.append_samples(settings.DATA_DIR, PERSON, samples)
        config = train.resolve_config(settings, TrainRequest(speaker=PERSON))
        stored = store.load_speaker(settings.DATA_DIR, PERSON).messages
        started = time.monotonic()
        outcome = train.train_lora(stored, PERSON, config, settings.OUTPUT_DIR, settings.MODELS_DIR,
                                   evaluate=evals.after_training(settings, PERSON, config))
        print(f"trained {outcome.info['steps']} steps on {outcome.info['num_samples']} samples in "
              f"{time.monotonic() - started:.0f} s", flush=True)
    info = json.loads((settings.OUTPUT_DIR / PERSON / "training_info.json").read_text(encoding="utf-8"))
    report = json.loads((settings.OUTPUT_DIR / PERSON / "eval.json").read_text(encoding="utf-8"))

    engine = PersonaEngine(settings.BASE_MODEL, settings.MODELS_DIR, settings.OUTPUT_DIR, "cpu", False, 1)
    rows = []
    for i, (key, _, question) in enumerate(FACTS):
        asked = [Turn(speaker=FRIEND, content=question)]
        decoding = persona_decoding(settings, [*asked, Turn(speaker=PERSON, content="")])
        row = {"fact": key, "question": question}
        for label, k in (("with_memory", settings.MEMORY_K), ("without_memory", 0)):
            started = time.perf_counter()
            recalled = memory.recall(settings.DATA_DIR, PERSON, asked, k)
            recall_ms = (time.perf_counter() - started) * 1000
            messages = chat_format.to_messages(memory.recalled_turns(recalled, PERSON) + asked, PERSON)
            out = engine.generate(PERSON, messages, replace(decoding, seed=i))
            row[label] = {"reply": out.text, "recalled": [r.text for r in recalled], "hit": key.lower() in out.text.lower(),
                          "fact_recalled": any(key.lower() in r.text.lower() for r in recalled),
                          "recall_ms": round(recall_ms, 2)}
        rows.append(row)
        print(f"{key:>11}: with {row['with_memory']['hit']!s:5} {row['with_memory']['reply'][:60]!r:64} "
              f"without {row['without_memory']['hit']!s:5} {row['without_memory']['reply'][:40]!r}", flush=True)

    share = {label: round(sum(r[label]["hit"] for r in rows) / len(rows), 3) for label in ("with_memory", "without_memory")}
    retrieved = round(sum(r["with_memory"]["fact_recalled"] for r in rows) / len(rows), 3)
    result = {"command": " ".join(sys.argv), "settings_overridden": overrides, "memory_k": settings.MEMORY_K,
              "facts": len(FACTS), "samples": info["num_samples"], "steps": info["steps"],
              "train_runtime_s": info["train_runtime_s"], "fact_recall": share,
              "fact_in_recalled_messages": retrieved,
              "held_out_loss": {"base": report["held_out"]["base"]["loss"], "adapter": report["held_out"]["adapter"]["loss"]},
              "memory_report": report.get("memory"), "generation": report.get("generation"), "rows": rows}
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "generation")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
