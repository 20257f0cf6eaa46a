"""How a conversation becomes the model's text: the chat template, turns → chat messages, a sample →
token ids and labels (only the speaker's reply supervised), the rendering users inspect, and where
a generated reply ends.

Training, evaluation and generation all render through here, so the model sees at inference
exactly the format it was trained on. Knows nothing of models' weights, devices, files or HTTP: it
takes turns, samples and a tokenizer.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from models import Sample, Turn

log = logging.getLogger("persona_lora.chat_format")

IGNORE = -100

# A checkpoint that ships no chat template is taken for a base (pretrained) model, as the default
# GGUF is: it never learnt a chat format's turn tokens (after a reply, gemma-3-270m gives Gemma's
# <end_of_turn> a probability of 3e-10, rank 251,599 of 262,144) and reads them as noise, while it
# knows a transcript — "Name: line" — and ends a line by itself (P("\n") = 0.41 at a reply's end).
# So such checkpoints get a transcript: one line per turn, the persona's line ended by a new line.
# Each message carries its `turns` (name and text); a message without them is one line, named by its
# `name` or role. `assistant_name` names the persona on the line it is asked to write.
TRANSCRIPT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% set turns = m['turns'] if m['turns'] is defined else [{'name': m['name'] if m['name'] is defined else m['role'], 'text': m['content']}] %}"
    "{% for t in turns %}{{ t['name'] }}: {{ t['text'] | replace('\n', ' ') | trim }}\n{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ assistant_name | default('assistant') }}:{% endif %}"
)
TRANSCRIPT_SOURCE = "transcript (the checkpoint ships no chat template)"
# Where a reply has ended, besides EOS: tokens of chat templates (the end of the turn, or the start of
# the next where a model writes it itself), and for the transcript the end of the line.
TURN_MARKERS = ("<end_of_turn>", "<start_of_turn>")


def chat_template_for(tokenizer) -> tuple[str, str]:
    """The template to format with, and where it came from: the checkpoint's own chat template, or a
    transcript for a base model that ships none."""
    if tokenizer.chat_template:
        return tokenizer.chat_template, "tokenizer"
    return TRANSCRIPT_TEMPLATE, TRANSCRIPT_SOURCE


def turn_end_strings(template: str) -> list[str]:
    """Text that ends a generated reply under `template`: a transcript's line ends the turn."""
    return ["\n"] if template == TRANSCRIPT_TEMPLATE else []


def to_messages(context: list[Turn], speaker: str, reply: str | None = None) -> list[dict]:
    """The context as chat messages (the speaker as assistant, everyone else as user), then the
    reply when given; without one, the messages the speaker's next reply answers.

    Consecutive turns of one role are merged and empty user turns are put where the roles would
    not alternate, since most templates (Gemma's among them) require user/assistant alternation.
    Names of others are kept in the text when more than one other person speaks. Each message also
    keeps its `turns` (name and text), which the transcript template writes one line each.
    """
    others = {t.speaker for t in context if t.speaker != speaker}
    messages: list[dict] = []
    for turn in context:
        role = "assistant" if turn.speaker == speaker else "user"
        text = f"{turn.speaker}: {turn.content}" if role == "user" and len(others) > 1 else turn.content
        line = {"name": turn.speaker, "text": turn.content}
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n" + text
            messages[-1]["turns"].append(line)
        else:
            messages.append({"role": role, "content": text, "turns": [line]})
    if not messages or messages[0]["role"] == "assistant":
        messages.insert(0, {"role": "user", "content": "", "turns": []})
    if messages[-1]["role"] == "assistant":
        messages.append({"role": "user", "content": "", "turns": []})
    if reply is not None:
        messages.append({"role": "assistant", "content": reply, "turns": [{"name": speaker, "text": reply}]})
    return messages


def prompt_text(tokenizer, template: str, messages: list[dict], speaker: str) -> str:
    """The text that asks `speaker` (the assistant) for the next turn."""
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True,
                                         assistant_name=speaker)


def bounded_prompt_ids(tokenizer, template: str, messages: list[dict], speaker: str, max_tokens: int) -> tuple[list[int], int]:
    """The token ids of the prompt asking `speaker` for the next turn after `messages`, within
    `max_tokens`: the oldest turns are left out until it fits, as format_sample drops context in
    training; a last turn too long alone keeps its end (and BOS). Also how many turns were left out.
    The fewest turns left out is found by bisection: 13 renderings for 5,000 turns, not 5,000."""
    ids = _prompt_ids(tokenizer, template, messages, speaker)
    if len(ids) <= max_tokens:
        return ids, 0
    turns = [Turn.model_construct(speaker=t["name"], content=t["text"]) for m in messages for t in m.get("turns", [])]
    lo, hi = 1, max(len(turns) - 1, 1)  # leave out lo..hi turns; never the last one
    while lo < hi:
        mid = (lo + hi) // 2
        if len(_prompt_ids(tokenizer, template, to_messages(turns[mid:], speaker), speaker)) <= max_tokens:
            hi = mid
        else:
            lo = mid + 1
    ids = _prompt_ids(tokenizer, template, to_messages(turns[lo:], speaker), speaker) if turns else ids
    if len(ids) > max_tokens:  # the last turn alone is too long: its latest tokens
        head = ids[:1] if ids[0] == tokenizer.bos_token_id else []
        ids = head + ids[len(ids) - (max_tokens - len(head)):]
    return ids, min(lo, len(turns))


def _prompt_ids(tokenizer, template: str, messages: list[dict], speaker: str) -> list[int]:
    return tokenizer(prompt_text(tokenizer, template, messages, speaker), add_special_tokens=False)["input_ids"]


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    context_turns_dropped: int = 0

    @property
    def supervised(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


def format_sample(sample: Sample, speaker: str, tokenizer, template: str, max_len: int) -> Encoded | None:
    """Token ids and labels: the reply's tokens (and the template's end of turn) are supervised,
    the context is -100. Oldest context turns are dropped until the sample fits in max_len; a reply
    longer than that is cut. None when no supervised token would remain.
    """
    context = list(sample.context)
    dropped = 0
    while True:
        messages = to_messages(context, speaker, sample.reply)
        prompt = prompt_text(tokenizer, template, messages[:-1], speaker)
        full = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, assistant_name=speaker)
        if not full.startswith(prompt):
            log.warning("chat template: the prompt is not a prefix of prompt+reply; splitting at the common prefix")
            prompt = os.path.commonprefix([prompt, full])
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        reply_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
        if len(prompt_ids) + len(reply_ids) <= max_len or not context:
            break
        context = context[1:]
        dropped += 1
    ids = (prompt_ids + reply_ids)[:max_len]
    labels = ([IGNORE] * len(prompt_ids) + reply_ids)[:max_len]
    if all(label == IGNORE for label in labels):
        return None
    return Encoded(ids, labels, dropped)


def encode_all(samples: list[Sample], speaker: str, tokenizer, template: str, max_len: int) -> list[Encoded]:
    """The samples that keep a supervised token within max_len, formatted."""
    return [e for e in (format_sample(s, speaker, tokenizer, template, max_len) for s in samples) if e is not None]


def render_samples(samples: list[Sample], speaker: str, tokenizer, template: str, max_len: int) -> list[dict[str, Any]]:
    """Samples exactly as training formats them, decoded back to text with the trained span marked."""
    rendered = []
    for sample in samples:
        encoded = format_sample(sample, speaker, tokenizer, template, max_len)
        if encoded is None:
            continue
        start = next(i for i, label in enumerate(encoded.labels) if label != IGNORE)
        prompt = tokenizer.decode(encoded.input_ids[:start])
        completion = tokenizer.decode(encoded.input_ids[start:])
        rendered.append({
            "sample_id": sample.id, "prompt": prompt, "completion": completion, "marked": f"{prompt}⟦{completion}⟧",
            "tokens": len(encoded.input_ids), "supervised_tokens": len(encoded.input_ids) - start,
            "context_turns_dropped": encoded.context_turns_dropped,
        })
    return rendered


def turn_starts(context: list[Turn]) -> list[str]:
    """Where a generated reply has run into the next turn: a new line that starts with the name of
    anyone in the conversation ('\nBob:'), the way others' turns are written in group chats."""
    return [f"\n{name}:" for name in dict.fromkeys(t.speaker for t in context)]


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end a generated reply: EOS and the chat templates' turn markers the tokenizer knows."""
    stops = {tokenizer.eos_token_id}
    for marker in TURN_MARKERS:
        token = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(token, int) and token != tokenizer.unk_token_id:
            stops.add(token)
    return sorted(s for s in stops if s is not None)
