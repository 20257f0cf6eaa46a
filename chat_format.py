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

# Known chat templates by `config.model_type`, for checkpoints that ship none (the default GGUF has
# none). Gemma's is the official turn format, with roles assumed to alternate (to_messages ensures it).
_GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
KNOWN_CHAT_TEMPLATES = {
    "gemma": _GEMMA_TEMPLATE,
    "gemma2": _GEMMA_TEMPLATE,
    "gemma3": _GEMMA_TEMPLATE,
    "gemma3_text": _GEMMA_TEMPLATE,
}
# For anything else without a template: role-prefixed lines, EOS after the speaker's reply so the
# model learns to stop.
PLAIN_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' and eos_token %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)
# Tokens at which a reply has ended, besides EOS: the template's end of turn, or the start of the
# next turn where a model that never learnt the format writes it itself.
TURN_MARKERS = ("<end_of_turn>", "<start_of_turn>")


def chat_template_for(tokenizer, model_type: str) -> tuple[str, str]:
    """The template to format with, and where it came from."""
    if tokenizer.chat_template:
        return tokenizer.chat_template, "tokenizer"
    if model_type in KNOWN_CHAT_TEMPLATES:
        return KNOWN_CHAT_TEMPLATES[model_type], f"known template for {model_type}"
    return PLAIN_CHAT_TEMPLATE, "plain fallback"


def to_messages(context: list[Turn], speaker: str, reply: str | None = None) -> list[dict[str, str]]:
    """The context as chat messages (the speaker as assistant, everyone else as user), then the
    reply when given; without one, the messages the speaker's next reply answers.

    Consecutive turns of one role are merged and empty user turns are put where the roles would
    not alternate, since most templates (Gemma's among them) require user/assistant alternation.
    Names of others are kept in the text when more than one other person speaks.
    """
    others = {t.speaker for t in context if t.speaker != speaker}
    messages: list[dict[str, str]] = []
    for turn in context:
        role = "assistant" if turn.speaker == speaker else "user"
        text = f"{turn.speaker}: {turn.content}" if role == "user" and len(others) > 1 else turn.content
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n" + text
        else:
            messages.append({"role": role, "content": text})
    if not messages or messages[0]["role"] == "assistant":
        messages.insert(0, {"role": "user", "content": ""})
    if messages[-1]["role"] == "assistant":
        messages.append({"role": "user", "content": ""})
    if reply is not None:
        messages.append({"role": "assistant", "content": reply})
    return messages


def prompt_text(tokenizer, template: str, messages: list[dict[str, str]]) -> str:
    """The text that asks for the assistant's next turn."""
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)


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
        prompt = prompt_text(tokenizer, template, messages[:-1])
        full = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
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
    """Token ids that end a generated reply: EOS and the template's turn markers the tokenizer knows."""
    stops = {tokenizer.eos_token_id}
    for marker in TURN_MARKERS:
        token = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(token, int) and token != tokenizer.unk_token_id:
            stops.add(token)
    return sorted(s for s in stops if s is not None)
