"""Generation: a reply from a model it is handed (`generate`, `stream`), and the engine that keeps one
base model in memory for every speaker's adapter.

Adapters are loaded into the base by name (peft multi-adapter) and switched per request, with a
bounded LRU cache. An adapter retrained since it was loaded (its training_info.json changed) is
loaded afresh, never served stale. One lock serialises generation: one model, one active adapter.
Knows nothing of HTTP, training or evaluation.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

from config import Settings
from errors import StorageError
from lm import adapters, base_model, chat_format
from models import Turn

log = logging.getLogger("persona_lora.infer")


class AdapterNotFound(LookupError):
    pass


@dataclass
class Decoding:
    """How a reply is sampled (temperature 0 is greedy) and where it ends: at the end of the turn, or
    at any of `stop` (not included in the reply: the model starting someone else's turn, say)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


def persona_decoding(settings: Settings, context: list[Turn] | None = None, **overrides) -> Decoding:
    """The service's decoding defaults (GENERATION_* settings), stopping where the model starts a
    turn of anyone in `context`; `overrides` that are None keep the default."""
    decoding = Decoding(max_new_tokens=settings.GENERATION_MAX_NEW_TOKENS, temperature=settings.GENERATION_TEMPERATURE,
                        top_p=settings.GENERATION_TOP_P, repetition_penalty=settings.GENERATION_REPETITION_PENALTY,
                        stop=chat_format.turn_starts(context or []))
    for name, value in overrides.items():
        if value is not None:
            setattr(decoding, name, list(value) + decoding.stop if name == "stop" else value)
    return decoding


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (the turn ended) or "length" (cut at max_new_tokens)


def context_length(model, tokenizer) -> int | None:
    """The most positions the model takes (its config's max_position_embeddings; else the tokenizer's
    model_max_length where that is a real bound); None when neither says."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        return positions
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else None


def _inputs(model, tokenizer, template: str, messages: list[dict], name: str, decoding: Decoding):
    """The prompt's ids and mask, bound by the model's context: room is kept for the reply
    (max_new_tokens, at most half the context) and the oldest turns left out until the prompt fits in
    the rest. Also the decoding, its max_new_tokens cut to what the positions left allow. A 32,227-token
    prompt went through a model of 1,024 positions (4.2 s, +200 MB) before."""
    import torch

    limit = context_length(model, tokenizer)
    if limit is None:
        ids = tokenizer(chat_format.prompt_text(tokenizer, template, messages, name), add_special_tokens=False)["input_ids"]
    else:
        room = min(decoding.max_new_tokens, limit // 2)
        ids, dropped = chat_format.bounded_prompt_ids(tokenizer, template, messages, name, limit - room)
        if dropped:
            log.info("prompt bound to the model's %d positions: %d oldest turns left out, %d tokens kept", limit,
                     dropped, len(ids))
        decoding = replace(decoding, max_new_tokens=min(decoding.max_new_tokens, limit - len(ids)))
    ids = torch.tensor([ids], dtype=torch.long, device=model.device)
    return ids, torch.ones_like(ids), decoding


def _stops(template: str, decoding: Decoding) -> list[str]:
    return chat_format.turn_end_strings(template) + [s for s in decoding.stop if s not in chat_format.turn_end_strings(template)]


def _generate_kwargs(tokenizer, template: str, decoding: Decoding, prompt_tokens: int) -> dict:
    """generate()'s arguments. The repetition penalty counts the reply's own tokens only: over the prompt
    it also lowered the line end, the speakers' names and every common word the conversation used."""
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        StoppingCriteriaList,
    )

    kwargs = dict(max_new_tokens=decoding.max_new_tokens, eos_token_id=chat_format.stop_token_ids(tokenizer),
                  pad_token_id=tokenizer.pad_token_id)
    processors = [_VisibleFirst(tokenizer, kwargs["eos_token_id"], prompt_tokens)]  # no empty replies
    if decoding.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(float(decoding.repetition_penalty), prompt_ignore_length=prompt_tokens))
    kwargs["logits_processor"] = LogitsProcessorList(processors)
    if stops := _stops(template, decoding):
        kwargs["stopping_criteria"] = StoppingCriteriaList([_StopStrings(tokenizer, stops, prompt_tokens)])
    if decoding.temperature > 0:
        kwargs.update(do_sample=True, temperature=decoding.temperature, top_p=decoding.top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def blank_token_ids(tokenizer) -> list[int]:
    """Ids of the tokens that leave a reply empty when they come first: those whose text is blank
    (special tokens decode to nothing) or starts a new line before anything visible (in a transcript the
    line end ends the turn, '\nBob:' starts someone else's). Decoded once per tokenizer and kept on it:
    the Rust tokenizer decodes gemma's 262k tokens in about a second."""
    cached = getattr(tokenizer, "_persona_blank_ids", None)
    if cached is not None:
        return cached
    ids = [[i] for i in range(len(tokenizer))]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    texts = backend.decode_batch(ids, skip_special_tokens=True) if backend is not None else tokenizer.batch_decode(ids, skip_special_tokens=True)
    blank = [i for i, t in enumerate(texts) if not t.strip() or "\n" in t[: len(t) - len(t.lstrip())] or "\r" in t[: len(t) - len(t.lstrip())]]
    tokenizer._persona_blank_ids = blank
    return blank


class _VisibleFirst:
    """A logits processor: until the reply holds a visible character, neither the end of the turn nor
    a blank or line-starting token (blank_token_ids) can be chosen, so that a reply is never empty (two
    of eighteen sampled replies were `""` with finish_reason "stop"). A caller's own stop string can
    still end a reply at once: that was asked for."""

    def __init__(self, tokenizer, end_ids: list[int], prompt_tokens: int):
        self.tokenizer, self.prompt_tokens = tokenizer, prompt_tokens
        self.banned = sorted(set(blank_token_ids(tokenizer)) | set(end_ids))
        self.visible: set[int] = set()  # rows whose reply has a visible character: it only grows

    def __call__(self, input_ids, scores):
        for row in range(input_ids.shape[0]):
            if row in self.visible:
                continue
            if self.tokenizer.decode(input_ids[row, self.prompt_tokens:], skip_special_tokens=True).strip():
                self.visible.add(row)
            else:
                scores[row, [i for i in self.banned if i < scores.shape[1]]] = float("-inf")
        return scores


class _StopStrings:
    """A stopping criterion: the reply so far (the prompt's `prompt_tokens` excluded) holds a stop string.
    transformers' own StopStringCriteria embeds the whole vocabulary for each new set of strings: 10 s
    a request with gemma's 262k tokens on this 2-core CPU (measured), longer than the reply itself, and
    each conversation has its own names. This decodes the reply's last tokens at each step instead."""

    def __init__(self, tokenizer, stop: list[str], prompt_tokens: int):
        self.tokenizer, self.stop, self.prompt_tokens = tokenizer, stop, prompt_tokens
        self.window = 2 * max(len(s) for s in stop) + 8  # tokens: a stop string's characters span fewer

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = [any(s in self.tokenizer.decode(row[max(self.prompt_tokens, len(row) - self.window):],
                                               skip_special_tokens=True) for s in self.stop) for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _finish(text: str, new: list[int], kwargs: dict, stop: list[str]) -> tuple[str, str]:
    """The reply cut before the first stop string, and why it ended: 'stop' (end of turn or a stop
    string) or 'length' (cut at max_new_tokens)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    if cut >= 0:
        return text[:cut].strip(), "stop"
    return text.strip(), "stop" if new and new[-1] in kwargs["eos_token_id"] else "length"


def generate(model, tokenizer, template: str, messages: list[dict], decoding: Decoding, name: str = "assistant") -> Generation:
    """The next turn of `name` (the assistant) after `messages`, from `model` as it is (adapter active
    or not)."""
    import torch

    ids, mask, decoding = _inputs(model, tokenizer, template, messages, name, decoding)
    if decoding.seed is not None:
        torch.manual_seed(decoding.seed)
    kwargs = _generate_kwargs(tokenizer, template, decoding, ids.shape[1])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    new = out[0, ids.shape[1]:].tolist()
    text, reason = _finish(tokenizer.decode(new, skip_special_tokens=True), new, kwargs, _stops(template, decoding))
    return Generation(text, ids.shape[1], len(new), reason)


def sampling(request) -> dict:
    """The sampling fields a request set (models.Sampling), as persona_decoding overrides."""
    return {name: getattr(request, name) for name in ("temperature", "top_p", "repetition_penalty", "seed", "stop")}


class _StopCutter:
    """Streams text pieces while holding back what could be the start of a stop string, so that no
    stop string (or part of one) ever reaches the client."""

    def __init__(self, stop: list[str]):
        self.stop, self.pending, self.sent, self.stopped = stop, "", "", False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.pending += piece
        cut = min((i for i in (self.pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
        else:
            hold = max((k for s in self.stop for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
            out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        if not self.sent:
            out = out.lstrip()
        self.sent += out
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        self.sent += out
        return out


def base_only(model):
    """A context in which a peft model answers as its base alone."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()


class PersonaEngine:
    def __init__(self, base_model_name: str, models_dir: Path, output_root: Path, device: str, load_in_8bit: bool,
                 cache_size: int):
        self.base_model, self.models_dir, self.output_root = base_model_name, models_dir, output_root
        self.device, self.load_in_8bit, self.cache_size = device, load_in_8bit, cache_size
        self._lock = threading.Lock()
        self._model = None
        self._tokenizer = None
        self._template = None
        self._cache: OrderedDict[str, tuple[str, str]] = OrderedDict()  # speaker -> (adapter key, stamp)

    # --- loading -------------------------------------------------------------------------------

    def _ensure_base(self) -> None:
        if self._model is not None:
            return
        device = base_model.resolve_device(self.device)
        path = base_model.resolve_base_model(self.base_model, self.models_dir)
        self._tokenizer = base_model.load_tokenizer(path)
        # 8-bit matmuls are slower than float32 on a CPU: quantize for generation on CUDA only.
        model = base_model.load_base_model(path, self.load_in_8bit and device.startswith("cuda"), device)
        model.eval()
        self._template, _ = chat_format.chat_template_for(self._tokenizer)
        self._model = model
        log.info("generation: loaded base model %s on %s", self.base_model, device)

    def _activate(self, speaker: str | None) -> None:
        """Make the speaker's adapter the active one (None: the base model alone)."""
        self._ensure_base()
        if speaker is None:
            return
        info = adapters.info(self.output_root, speaker)
        if info is None:
            raise AdapterNotFound(speaker)
        stamp = str(info.get("created_at"))
        cached = self._cache.get(speaker)
        if cached and cached[1] == stamp:
            self._cache.move_to_end(speaker)
            self._model.set_adapter(cached[0])
            return
        key = "a" + hashlib.sha256(f"{speaker}\0{stamp}".encode()).hexdigest()[:16]  # peft names must be identifiers
        place = adapters.folder(self.output_root, speaker)
        self._load(speaker, place, key)
        self._model.set_adapter(key)
        self._model.eval()
        if cached:  # retrained since it was loaded: drop the stale weights
            self._model.delete_adapter(cached[0])
            del self._cache[speaker]
        self._cache[speaker] = (key, stamp)
        while len(self._cache) > self.cache_size:
            _, (old_key, _) = self._cache.popitem(last=False)
            self._model.delete_adapter(old_key)
        log.info("generation: loaded adapter of %s (%d cached)", speaker, len(self._cache))

    def _load(self, speaker: str, place: Path, key: str) -> None:
        """Load the adapter at `place` as `key`. A folder peft cannot load (a truncated
        adapter_model.safetensors, no adapter_config.json: SafetensorError, ValueError) raises
        StorageError naming the adapter and what to do, and leaves no half-loaded adapter behind."""
        from peft import PeftModel

        first = not isinstance(self._model, PeftModel)
        try:
            if first:
                self._model = PeftModel.from_pretrained(self._model, str(place), adapter_name=key)
            else:
                self._model.load_adapter(str(place), adapter_name=key)
        except Exception as exc:  # noqa: BLE001 - whatever peft, safetensors or torch raise for a damaged folder
            if first:  # from_pretrained may have injected LoRA layers into the base: load it afresh next time
                self._model = self._tokenizer = None
            elif key in getattr(self._model, "peft_config", {}):
                self._model.delete_adapter(key)
            log.warning("generation: the adapter of %s in %s cannot be loaded (%s)", speaker, place, type(exc).__name__)
            raise StorageError(
                f"the adapter of speaker '{speaker}' is damaged and cannot be loaded ({type(exc).__name__} reading "
                f"{self.output_root.name}/{place.name}); train it again with POST /train, which replaces it, or delete "
                "that folder") from None

    def _as(self, speaker: str | None):
        return base_only(self._model) if speaker is None else nullcontext()

    @contextmanager
    def session(self, speaker: str | None):
        """(model, tokenizer, template) with the speaker's adapter active (None: the base alone),
        held exclusively for the duration of the block."""
        with self._lock:
            self._activate(speaker)
            with self._as(speaker):
                yield self._model, self._tokenizer, self._template

    def cached_speakers(self) -> list[str]:
        return list(self._cache)

    # --- generating ----------------------------------------------------------------------------

    def generate(self, speaker: str | None, messages: list[dict], decoding: Decoding) -> Generation:
        """The speaker's next turn (None: the base model's, as 'assistant')."""
        with self.session(speaker) as (model, tokenizer, template):
            return generate(model, tokenizer, template, messages, decoding, speaker or "assistant")

    def stream(self, speaker: str | None, messages: list[dict], decoding: Decoding) -> Iterator[str | Generation]:
        """Yield the reply in pieces as they are generated (transformers' TextIteratorStreamer), then the
        whole `Generation` (its token counts and finish reason) as the last item."""
        import torch
        from transformers import TextIteratorStreamer

        self._lock.acquire()
        try:
            self._activate(speaker)
            ids, mask, decoding = _inputs(self._model, self._tokenizer, self._template, messages, speaker or "assistant",
                                          decoding)
            streamer = TextIteratorStreamer(self._tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
            if decoding.seed is not None:
                torch.manual_seed(decoding.seed)
            kwargs = _generate_kwargs(self._tokenizer, self._template, decoding, ids.shape[1])
            outcome: list = []

            def run():
                try:
                    with torch.no_grad(), self._as(speaker):
                        outcome.append(self._model.generate(input_ids=ids, attention_mask=mask, streamer=streamer, **kwargs))
                finally:
                    self._lock.release()

            worker = threading.Thread(target=run, name="generate", daemon=True)
            worker.start()
        except BaseException:
            self._lock.release()
            raise
        cutter = _StopCutter(_stops(self._template, decoding))
        for piece in streamer:
            if out := cutter.feed(piece):
                yield out
        if out := cutter.flush().rstrip():
            yield out
        worker.join()
        new = outcome[0][0, ids.shape[1]:].tolist() if outcome else []
        reason = "stop" if cutter.stopped or (new and new[-1] in kwargs["eos_token_id"]) else "length"
        yield Generation(cutter.sent.strip(), ids.shape[1], len(new), reason)


def created() -> int:
    return int(time.time())
