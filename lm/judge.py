"""A judge of style: would you know who said it? A text classifier over the real messages of the people
in the speaker's conversations (scikit-learn: TF-IDF of character 2–5-grams and of words, a logistic
regression, one class per name), trained on the training split only, then asked who said the person's
real held-out replies (its ceiling), the adapter's generated replies and the base model's.

Pure: takes samples and texts, returns numbers and a sentence. Knows nothing of models, tokens, files
or how the replies were generated; imports scikit-learn inside functions (the API imports lm.evals).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from models import Sample

MIN_MESSAGES = 5  # per class: fewer real messages say nothing of a voice, and the class is left out
FEW_OTHERS = 30  # other voices' messages in the person's own conversations below which other stored speakers' join


def _key(text: str) -> str:
    return " ".join(text.split()).lower()


def training_messages(speaker: str, train: list[Sample], others: dict[str, list[Sample]],
                      held_out_replies: list[str] = ()) -> list[tuple[str, str]]:
    """(name, text) of every real message in the training split, each once: the person's replies, and
    every turn of the others in those samples' contexts; other stored speakers' replies when the person's
    conversations hold fewer than FEW_OTHERS messages of anyone else. A message that is one of the
    held-out replies is left out (a later sample's context may quote it), so that the ceiling is honest."""
    banned = {_key(t) for t in held_out_replies}
    seen: set[tuple[str, str]] = set()
    out: list[tuple[str, str]] = []

    def add(name: str, text: str) -> None:
        key = _key(text)
        if key and key not in banned and (name, key) not in seen:
            seen.add((name, key))
            out.append((name, text))

    for s in train:
        add(speaker, s.reply)
        for t in s.context:
            add(t.speaker, t.content)
    if sum(name != speaker for name, _ in out) < FEW_OTHERS:
        for name, samples in others.items():
            if name != speaker:
                for s in samples:
                    add(name, s.reply)
    return out


def _pipeline(seed: int):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    features = make_union(
        # characters keep case, punctuation and emoji: how a person writes, not only what about
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), lowercase=False, sublinear_tf=True, min_df=1),
        TfidfVectorizer(analyzer="word", token_pattern=r"(?u)\b\w+\b", sublinear_tf=True),
    )
    # balanced: a person with five times the others' messages is not named by default. newton-cg: 0.6 s on
    # 1,600 messages of 4 people (14k features) where lbfgs took 14.6 s on this 2-core CPU (measured).
    return make_pipeline(features, LogisticRegression(C=10.0, solver="newton-cg", max_iter=200, class_weight="balanced",
                                                      random_state=seed))


def classifier(messages: list[tuple[str, str]], seed: int = 0):
    """The judge's classifier, fitted on `messages` ((name, text)): `.predict(texts)` gives names. For a
    judge over other classes than one person's conversations (the persona bench: all its characters)."""
    return _pipeline(seed).fit([t for _, t in messages], [n for n, _ in messages])


def judge(speaker: str, messages: list[tuple[str, str]], real: list[str], adapter: list[str] | None = None,
          base: list[str] | None = None, seed: int = 0) -> dict[str, Any]:
    """The judge block of a report: trained on `messages` ((name, text)), the share of `real` (the
    person's held-out replies), `adapter` and `base` (generated replies) it names as `speaker`, with
    `chance` (1/classes). When it cannot be trained (too few messages, one voice only), a `note` says why."""
    counts = Counter(name for name, _ in messages)
    kept = {name for name, n in counts.items() if n >= MIN_MESSAGES}
    block: dict[str, Any] = {"classes": sorted(kept, key=lambda n: (n != speaker, n)),
                             "train_messages": {n: counts[n] for n in sorted(counts, key=lambda n: (n != speaker, n))}}
    if counts[speaker] < MIN_MESSAGES:
        block["note"] = (f"no judge of style: {speaker} has {counts[speaker]} real messages in the training split; "
                         f"it needs at least {MIN_MESSAGES}")
        return block
    if len(kept) < 2:
        block["note"] = (f"no judge of style: only {speaker}'s voice has {MIN_MESSAGES} or more messages in the "
                         "training split; upload conversations in which others speak too, or other speakers")
        return block
    if not real:
        block["note"] = "no judge of style: no held-out replies to score"
        return block
    pipe = _pipeline(seed).fit([t for n, t in messages if n in kept], [n for n, _ in messages if n in kept])

    def named(texts: list[str] | None) -> float | None:
        return round(sum(p == speaker for p in pipe.predict(texts)) / len(texts), 4) if texts else None

    block.update(ceiling=named(real), adapter=named(adapter), base=named(base),
                 chance=round(1 / len(kept), 4), real_messages=len(real),
                 generated=len(adapter or base or []))
    block["text"] = sentence(speaker, block)
    return {k: block[k] for k in ("text", "ceiling", "adapter", "base", "chance", "classes", "train_messages",
                                  "real_messages", "generated")}


def sentence(speaker: str, block: dict[str, Any]) -> str:
    """'sounds like Олена: 71% of the persona's replies, 38% of the base model's; 80% of Олена's real messages'."""
    pct = lambda x: f"{round(100 * x)}%"  # noqa: E731
    parts = []
    if block.get("adapter") is not None:
        parts.append(f"{pct(block['adapter'])} of the persona's replies")
    if block.get("base") is not None:
        parts.append(f"{pct(block['base'])} of the base model's")
    real = f"{pct(block['ceiling'])} of {speaker}'s real held-out messages (chance {pct(block['chance'])})"
    return f"sounds like {speaker}: " + (", ".join(parts) + "; " if parts else "") + real
