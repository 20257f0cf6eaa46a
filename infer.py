"""Generation with trained adapters: one base model in memory serves every speaker's adapter.

Adapters are loaded into the base by name (peft multi-adapter) and switched per request, with a
bounded LRU cache. An adapter retrained since it was loaded (its training_info.json changed) is
loaded afresh, never served stale. One lock serialises generation: one model, one active adapter.
Knows nothing of HTTP.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import train
from models import Turn, _check_speaker_name

log = logging.getLogger("persona_lora.infer")


class AdapterNotFound(LookupError):
    pass


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"


def turns_to_messages(turns: list[Turn], speaker: str) -> list[dict[str, str]]:
    """The conversation so far as chat messages, ready for the speaker's (assistant's) next reply."""
    from datetime import datetime, timezone

    from models import Sample

    sample = Sample(id="", context=turns, reply="", added_at=datetime.now(timezone.utc))
    return train.to_messages(sample, speaker)[:-1]


class PersonaEngine:
    def __init__(self, base_model: str, models_dir: Path, output_root: Path, device: str, load_in_8bit: bool,
                 cache_size: int):
        self.base_model, self.models_dir, self.output_root = base_model, models_dir, output_root
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
        device = "cuda" if self.device == "auto" and train._cuda_available() else ("cpu" if self.device == "auto" else self.device)
        path = train.resolve_base_model(self.base_model, self.models_dir)
        self._tokenizer = train.load_tokenizer(path)
        # 8-bit matmuls are slower than float32 on a CPU: quantize for generation on CUDA only.
        model = train.load_base_model(path, self.load_in_8bit and device.startswith("cuda"), device)
        model.eval()
        self._template, _ = train.chat_template_for(self._tokenizer, model.config.model_type)
        self._model = model
        log.info("generation: loaded base model %s on %s", self.base_model, device)

    def _activate(self, speaker: str | None) -> None:
        """Make the speaker's adapter the active one (None: the base model alone)."""
        from peft import PeftModel

        self._ensure_base()
        if speaker is None:
            return
        try:
            _check_speaker_name(speaker)
        except ValueError:
            raise AdapterNotFound(speaker) from None
        info = train.adapter_info(self.output_root, speaker)
        if info is None:
            raise AdapterNotFound(speaker)
        stamp = str(info.get("created_at"))
        cached = self._cache.get(speaker)
        if cached and cached[1] == stamp:
            self._cache.move_to_end(speaker)
            self._model.set_adapter(cached[0])
            return
        key = "a" + hashlib.sha256(f"{speaker}\0{stamp}".encode()).hexdigest()[:16]  # peft names must be identifiers
        folder = str(self.output_root / speaker)
        if isinstance(self._model, PeftModel):
            self._model.load_adapter(folder, adapter_name=key)
        else:
            self._model = PeftModel.from_pretrained(self._model, folder, adapter_name=key)
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

    @contextmanager
    def session(self, speaker: str | None):
        """(model, tokenizer, template) with the speaker's adapter active (None: the base alone),
        held exclusively for the duration of the block."""
        with self._lock:
            self._activate(speaker)
            with self._adapter_context(speaker):
                yield self._model, self._tokenizer, self._template

    def cached_speakers(self) -> list[str]:
        return list(self._cache)

    # --- generating ----------------------------------------------------------------------------

    def _inputs(self, messages: list[dict[str, str]]):
        import torch

        text = self._tokenizer.apply_chat_template(messages, chat_template=self._template, tokenize=False,
                                                   add_generation_prompt=True)
        ids = self._tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return ids.to(self._model.device), torch.ones_like(ids).to(self._model.device)

    def _generate_kwargs(self, max_new_tokens: int, temperature: float, top_p: float) -> dict:
        # The reply ends with the turn: at EOS, at the template's end-of-turn, or where a base model
        # that never learnt the format starts the next turn itself.
        stops = {self._tokenizer.eos_token_id}
        for marker in ("<end_of_turn>", "<start_of_turn>"):
            token = self._tokenizer.convert_tokens_to_ids(marker)
            if isinstance(token, int) and token != self._tokenizer.unk_token_id:
                stops.add(token)
        kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=sorted(s for s in stops if s is not None),
                      pad_token_id=self._tokenizer.pad_token_id)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    def generate(self, speaker: str | None, messages: list[dict[str, str]], max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> Generation:
        import torch

        with self._lock:
            self._activate(speaker)
            ids, mask = self._inputs(messages)
            if seed is not None:
                torch.manual_seed(seed)
            kwargs = self._generate_kwargs(max_new_tokens, temperature, top_p)
            with torch.no_grad(), self._adapter_context(speaker):
                out = self._model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        new = out[0, ids.shape[1]:].tolist()
        stopped = bool(new) and new[-1] in kwargs["eos_token_id"]
        text = self._tokenizer.decode(new, skip_special_tokens=True).strip()
        return Generation(text, ids.shape[1], len(new), "stop" if stopped or len(new) < max_new_tokens else "length")

    def stream(self, speaker: str | None, messages: list[dict[str, str]], max_new_tokens: int = 64,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> Iterator[str]:
        """Yield the reply in pieces as they are generated (transformers' TextIteratorStreamer)."""
        import torch
        from transformers import TextIteratorStreamer

        self._lock.acquire()
        try:
            self._activate(speaker)
            ids, mask = self._inputs(messages)
            streamer = TextIteratorStreamer(self._tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
            if seed is not None:
                torch.manual_seed(seed)

            def run():
                try:
                    with torch.no_grad(), self._adapter_context(speaker):
                        self._model.generate(input_ids=ids, attention_mask=mask, streamer=streamer,
                                             **self._generate_kwargs(max_new_tokens, temperature, top_p))
                finally:
                    self._lock.release()

            threading.Thread(target=run, name="generate", daemon=True).start()
        except BaseException:
            self._lock.release()
            raise
        first = True
        for piece in streamer:
            if first:
                piece, first = piece.lstrip(), False
            if piece:
                yield piece

    def _adapter_context(self, speaker: str | None):
        from contextlib import nullcontext

        if speaker is None and hasattr(self._model, "disable_adapter"):
            return self._model.disable_adapter()
        return nullcontext()


def created() -> int:
    return int(time.time())
