"""Training of one speaker's LoRA adapter: the resolved config, the held-out split, the Trainer's
callbacks, and `train_lora` (prepare the data and model → train → write the adapter folder). Also a
command-line tool:

    python train.py --speaker User1 [--epochs N] [--max-steps N] [--no-8bit]

Knows nothing of HTTP, the job database or how an adapter is evaluated: it takes samples, a
resolved TrainConfig and an output folder, and hands the trained model to an `evaluate` callable
when given one. torch, transformers and peft are imported inside functions so that the API starts fast.
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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import memory
from config import DEFAULT_BASE_MODEL, Settings, get_settings
from errors import TrainingError
from lm import adapters, base_model, callbacks as run_callbacks, chat_format, packing, passes, preference
from models import Sample, TrainConfig, TrainRequest

log = logging.getLogger("persona_lora.train")

# (model, tokenizer, template, held-out samples, adapter folder, training info, the training split memory recalls
# from) → evaluation report: run on the trained model still in memory, writing its files before the folder is installed.
Evaluator = Callable[[Any, Any, str, list[Sample], Path, dict[str, Any], list[Sample]], dict[str, Any]]


class TrainingStopped(Exception):
    """Training was asked to stop (server shutdown or cancel) before it finished."""


# --- configuration -----------------------------------------------------------------------------


def resolve_config(settings: Settings, request: TrainRequest) -> TrainConfig:
    """Defaults < settings < request, resolved once and logged with where each value came from.
    The device stays as set (`auto` is resolved by the process that trains, which imports torch)."""
    config = TrainConfig(
        base_model=settings.BASE_MODEL,
        load_in_8bit=settings.LOAD_IN_8BIT,
        quant=settings.QUANT,
        device=settings.DEVICE,
        epochs=request.epochs or settings.EPOCHS,
        learning_rate=request.learning_rate or settings.LEARNING_RATE,
        max_steps=request.max_steps,
        batch_size=request.batch_size,
        batch_tokens=settings.BATCH_TOKENS if request.batch_tokens is None else request.batch_tokens,
        max_seq_length=request.max_seq_length or settings.MAX_SEQ_LENGTH,
        seed=settings.SEED,
        checkpoint_steps=settings.CHECKPOINT_STEPS,
        eval_fraction=settings.EVAL_FRACTION,
        eval_min_samples=settings.EVAL_MIN_SAMPLES,
        memory_k=settings.MEMORY_K,
        keep_best_patience=settings.KEEP_BEST_PATIENCE,
        lora_r=settings.LORA_R,
        lora_alpha=settings.LORA_ALPHA or 2 * settings.LORA_R,
        target_modules=settings.LORA_TARGET_MODULES,
        preference_weight=settings.PREFERENCE_WEIGHT,
        preference_beta=settings.PREFERENCE_BETA,
        preference_context_turns=settings.PREFERENCE_CONTEXT_TURNS,
        report_to=settings.REPORT_TO,
    )
    sent = request.model_fields_set - {"speaker", "wait"}
    from_settings = sorted(settings.model_fields_set & {"LORA_R", "LORA_ALPHA", "LORA_TARGET_MODULES", "KEEP_BEST_PATIENCE",
                                                         "PREFERENCE_WEIGHT", "PREFERENCE_BETA", "PREFERENCE_CONTEXT_TURNS"})
    log.info("training config for %s: %s (from request: %s; set in settings: %s; rest from defaults)", request.speaker,
             config.model_dump(), sorted(sent) or "none", from_settings or "none of the LoRA, best-pass and preference settings")
    return config


# --- data --------------------------------------------------------------------------------------


def holdout_split(samples: list[Sample], fraction: float, minimum: int) -> tuple[list[Sample], list[Sample]]:
    """(train, held out): a deterministic share of samples, chosen by their ids so that the same
    sample is held out in every run and after new uploads. Nothing is held out below `minimum`."""
    if fraction <= 0 or len(samples) < minimum:
        return samples, []
    ranked = sorted(samples, key=lambda s: hashlib.sha256(f"holdout:{s.id}".encode()).hexdigest())
    held = {s.id for s in ranked[: max(1, round(len(samples) * fraction))]}
    return [s for s in samples if s.id not in held], [s for s in samples if s.id in held]


# Small data needs several passes: a few dozen messages in one pass teach nothing (the style test's
# 36 samples needed two passes at 3x the rate). From AUTO_SAMPLE_PASSES samples on, one pass.
AUTO_SAMPLE_PASSES = 200
AUTO_MAX_EPOCHS = 8


def auto_epochs(samples: int) -> float:
    """Passes over `samples` training samples when none were asked for: about AUTO_SAMPLE_PASSES
    samples seen in all, at least one pass, at most AUTO_MAX_EPOCHS."""
    return round(min(AUTO_MAX_EPOCHS, max(1.0, AUTO_SAMPLE_PASSES / max(samples, 1))), 2)


def data_hash(samples: list[Sample]) -> str:
    return hashlib.sha256("\n".join(sorted(s.id for s in samples)).encode()).hexdigest()


@dataclass
class TrainOutcome:
    model_path: Path
    info: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] | None = None
    evaluation_error: str | None = None


@dataclass
class Prepared:
    """Everything a run trains on: the base with its LoRA layers, the data, the effective rate."""

    model_path: str
    quant: str  # '8bit', '4bit' or 'none' (base_model.quant_name)
    tokenizer: Any
    template: str
    template_source: str
    model: Any
    train: list[Sample]
    held_out: list[Sample]
    encoded: list[chat_format.Encoded]
    items: list[dict]
    samples_per_step: float
    learning_rate: float
    epochs: float
    pool: list[Sample]  # the training split without memory: what memory recalls from
    objective: preference.Objective | None = None  # with preference pairs in the packs


def prepare(samples: list[Sample], speaker: str, config: TrainConfig, models_dir: Path, device: str) -> Prepared:
    """Load the base, hold samples out, format and pack the rest, and add the LoRA layers."""
    from peft import LoraConfig, get_peft_model

    if not samples:
        raise TrainingError(f"no stored messages for {speaker!r}; upload a dialog with POST /upload-text or an export with POST /upload-file first")
    started = time.monotonic()
    quant = base_model.quant_name(config.quant or config.load_in_8bit)
    model_path, tokenizer, model = base_model.load_for_training(config.base_model, models_dir, quant, device,
                                                                    config.target_modules)
    template, template_source = chat_format.chat_template_for(tokenizer)
    log.info("loaded base model %s (%s, %s) in %.1f s; chat template: %s", config.base_model,
             quant, device, time.monotonic() - started, template_source)

    train_samples, held_out = holdout_split(samples, config.eval_fraction, config.eval_min_samples)
    pool = train_samples  # what memory holds in training and evaluation: the training split only
    train_samples = memory.with_memory(train_samples, pool, speaker, config.memory_k)  # the memory it will have
    encoded = [chat_format.format_sample(s, speaker, tokenizer, template, config.max_seq_length) for s in train_samples]
    pairs = preference.encode_pairs(pool, speaker, tokenizer, template, config.max_seq_length, config.preference_context_turns,
                                    config.seed) if config.preference_weight else []
    kept = [e for e in encoded if e is not None]
    pairs = [p for e, p in zip(encoded, pairs) if e is not None]
    pairs = pairs if any(pairs) else []  # one voice: nobody else's lines to prefer the person's over
    if not kept:
        raise TrainingError(
            f"none of the {len(train_samples)} samples of {speaker!r} keeps a reply token within "
            f"max_seq_length={config.max_seq_length}; raise max_seq_length"
        )
    log.info("%d of %d samples fit max_seq_length=%d; %d supervised tokens", len(kept), len(train_samples),
             config.max_seq_length, sum(e.supervised for e in kept))
    if pairs:  # the reference: the base, before any LoRA layer
        started = time.monotonic()
        preference.reference_logps(model, pairs)
        log.info("preference: %d of %d samples paired with another participant's line (weight %s, beta %s, %d context "
                 "turns); the base scored the pairs in %.1f s", sum(p is not None for p in pairs), len(kept),
                 config.preference_weight, config.preference_beta, config.preference_context_turns, time.monotonic() - started)
    if config.batch_tokens:
        sft_tokens = sum(len(e.input_ids) for e in kept)
        budget = packing.step_tokens(sft_tokens, config.batch_tokens)
        budget += budget * sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs if p) // sft_tokens  # SFT's steps
        items = packing.pack_examples(kept, budget, config.seed, packing.row_tokens_for(device, budget), pairs)
    else:
        items = packing.pack_examples(kept, 1, config.seed, pairs=pairs) if pairs else packing.single_examples(kept)
    samples_per_step = len(kept) / len(items) * config.batch_size * int(os.environ.get("WORLD_SIZE", 1))
    learning_rate = packing.scaled_learning_rate(config.learning_rate, samples_per_step) if config.batch_tokens else config.learning_rate
    epochs = config.epochs or auto_epochs(len(kept))
    log.info("%d samples in %d sequences (%.1f samples per step); learning rate %.3g; %s epochs%s", len(kept),
             len(items), samples_per_step, learning_rate, epochs, "" if config.epochs else " (chosen for the amount of data)")

    # No prepare_model_for_kbit_training: its one effect here was to cast the bfloat16 norms and
    # embeddings of a quantized base to float32 on CUDA (on the CPU all is float32 already), which
    # made every activation float32 and each 8-bit matmul cast it back; TRL's SFTTrainer skips it too.
    targets = "all-linear" if [m.lower() for m in config.target_modules] == ["all-linear"] else config.target_modules  # peft's shorthand is a string
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, target_modules=targets, task_type="CAUSAL_LM")
    log.info("LoRA r=%d, alpha=%d, dropout %s on %s", config.lora_r, config.lora_alpha, config.lora_dropout, targets)
    model = get_peft_model(model, lora)
    return Prepared(model_path, quant, tokenizer, template, template_source, model, train_samples, held_out, kept, items,
                    samples_per_step, learning_rate, epochs, pool,
                    preference.Objective(config.preference_weight, config.preference_beta, {"pairs": sum(p is not None for p in pairs)})
                    if pairs else None)


def make_trainer(run: Prepared, config: TrainConfig, device: str, output_dir: Path, checkpointing: bool,
                 stop: threading.Event, callbacks: list, progress_bar: bool, run_name: str):
    """The transformers Trainer over the packed data, with the supervised-only loss (packing.packed_loss)."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainingArguments

    args = TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=run.epochs,
        max_steps=config.max_steps or -1,
        per_device_train_batch_size=config.batch_size,
        learning_rate=run.learning_rate,
        logging_steps=1,
        save_strategy="steps" if checkpointing else "no",
        save_steps=config.checkpoint_steps or 500,
        save_total_limit=1,  # the latest checkpoint is all a resume needs
        report_to=config.report_to,
        run_name=run_name,
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,  # every LoRA weight is used in every step
        average_tokens_across_devices=True,  # several processes compute the same loss as one
        seed=config.seed,
        use_cpu=device == "cpu",
        bf16=device.startswith("cuda"),
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        disable_tqdm=not progress_bar,
    )
    trainer = packing.trainer_class()(  # the loss: packing.packed_loss
        model=run.model,
        args=args,
        train_dataset=Dataset.from_list(run.items),
        processing_class=run.tokenizer,  # lets the Trainer count non-padding tokens
        data_collator=packing.PackedCollator(run.tokenizer.pad_token_id or 0),
        callbacks=[run_callbacks.stop_callback(stop), *callbacks],
        preference=run.objective,
    )
    if not progress_bar:  # the service logs through its job registry, not stdout
        trainer.remove_callback(PrinterCallback)
    return trainer


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
    evaluate: Evaluator | None = None,
) -> TrainOutcome:
    """Train the speaker's adapter and put it at `output_root/<speaker>/`, replacing the old one
    only when the new one is complete. `evaluate`, when given, sees the trained model before it is
    written; its report is returned with the outcome."""
    import torch
    from transformers import set_seed

    device = base_model.process_device(config.device)
    started = time.monotonic()
    stop = stop or threading.Event()
    set_seed(config.seed)
    run = prepare(samples, speaker, config, models_dir, device)
    tmp = adapters.new_tmp(output_root, speaker)
    checkpointing = bool(checkpoint_dir and config.checkpoint_steps)
    trainer = None
    try:  # from here on, any failure removes the temporary folder (a missing REPORT_TO package fails in make_trainer)
        held = chat_format.encode_all(memory.with_memory(run.held_out, run.pool, speaker, config.memory_k), speaker, run.tokenizer,
                                      run.template, config.max_seq_length) if run.held_out and run.epochs > 1 else []
        best = passes.best_pass_callback(run.model, held, config.keep_best_patience) if held and config.keep_best_patience else None
        trainer = make_trainer(run, config, device, checkpoint_dir if checkpointing else tmp / "trainer", checkpointing,
                               stop, [*(callbacks or []), *([best] if best else [])], progress_bar, run_name or speaker)
        result = trainer.train(resume_from_checkpoint=resume_from)
        if stop.is_set():
            raise TrainingStopped("training stopped before it finished")
        if not trainer.is_world_process_zero():  # data parallel: the main process writes the one adapter
            return TrainOutcome(adapters.folder(output_root, speaker), {"steps": trainer.state.global_step})
        info = _info(run, config, speaker, trainer, result, started)
        info.update({"passes": best.passes} if best else {})
        info.update({"preference": preference.summary(run.objective.stats)} if run.objective else {})
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        run.model.save_pretrained(tmp)
        run.tokenizer.chat_template = run.template
        run.tokenizer.save_pretrained(tmp)
        outcome = TrainOutcome(adapters.folder(output_root, speaker), info)
        if evaluate is not None:
            log.info("evaluating the adapter on %d held-out samples", len(run.held_out))
            run.model.eval()
            if run.quant != "none" and device == "cpu":
                # bitsandbytes' CPU int8 (and NF4) matmul turns the whole weight into float32 at every call:
                # cheap for 1024-token training batches, minutes for replies generated a token at a time.
                # The same quantized weights, dequantized once in memory (the adapter was saved above).
                run.model.get_base_model().dequantize()
            try:
                outcome.evaluation = evaluate(run.model, run.tokenizer, run.template, run.held_out, tmp, info, run.pool)
            except Exception as exc:  # the adapter is good; say why there is no report
                log.exception("evaluation failed")
                outcome.evaluation_error = f"{type(exc).__name__}: {exc}"
        outcome.model_path = adapters.install(tmp, output_root, speaker, info)  # training_info.json last: whole
        log.info("saved adapter to %s (%d steps, final loss %s)", outcome.model_path, info["steps"], info["final_loss"])
        return outcome
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        del trainer, run
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _info(run: Prepared, config: TrainConfig, speaker: str, trainer, result, started: float) -> dict[str, Any]:
    """training_info.json: what was trained, on what, how, and how it went."""
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "speaker": speaker,
        "base_model": config.base_model,
        "base_model_path": run.model_path,
        "config": config.model_dump(),
        "chat_template_source": run.template_source,
        "num_samples": len(run.train) + len(run.held_out),
        "num_heldout": len(run.held_out),
        "heldout_ids": sorted(s.id for s in run.held_out),
        "num_samples_used": len(run.encoded),
        "num_samples_dropped": len(run.train) - len(run.encoded),
        "context_turns_dropped": sum(e.context_turns_dropped for e in run.encoded),
        "supervised_tokens": sum(e.supervised for e in run.encoded),
        "total_tokens": sum(len(e.input_ids) for e in run.encoded),
        "packed_sequences": len(run.items),
        "epochs": run.epochs,
        "samples_per_step": round(run.samples_per_step, 3),
        "learning_rate_effective": run.learning_rate,
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 3),
        "data_hash": data_hash(run.train + run.held_out),
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "final_loss": losses[-1] if losses else None,
        "loss_history": losses,
        "duration_s": round(time.monotonic() - started, 3),
        "created_at": datetime.now(timezone.utc).isoformat(),
        "versions": _versions(),
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def render_dataset(samples: list[Sample], speaker: str, base: str, models_dir: Path, max_len: int,
                   tokenizer=None, pool: list[Sample] = (), memory_k: int = 0) -> dict[str, Any]:
    """Samples exactly as training formats them (chat template applied, the messages recalled from
    `pool`, the training split, leading the context; trained span marked) by `tokenizer`, or else by
    the tokenizer's text side loaded now (no torch)."""
    if tokenizer is None:
        if base == DEFAULT_BASE_MODEL:
            base_model.provision_default_model(models_dir)
        tokenizer = base_model.text_tokenizer(base, models_dir)  # no torch in the API process
    template, source = chat_format.chat_template_for(tokenizer)
    remembered = memory.with_memory(samples, list(pool), speaker, memory_k)
    recalled = {s.id: [t.content for t in r.context[: len(r.context) - len(s.context)] if t.speaker == speaker]
                for s, r in zip(samples, remembered)}
    rendered = chat_format.render_samples(remembered, speaker, tokenizer, template, max_len)
    for one in rendered:
        one["recalled"] = recalled[one["sample_id"]]
    return {"base_model": base, "chat_template_source": source, "max_seq_length": max_len, "data": rendered}


# --- command line ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import store
    from lm import (
        evals,  # the CLI evaluates like the service; train_lora itself knows no evaluation
    )

    cli = argparse.ArgumentParser(description="Train a speaker's LoRA adapter from ./data/<speaker>_messages.json.")
    cli.add_argument("--speaker", required=True)
    cli.add_argument("--epochs", type=float, help="passes over the data (default: chosen from its amount)")
    cli.add_argument("--learning-rate", type=float)
    cli.add_argument("--max-steps", type=int)
    cli.add_argument("--batch-size", type=int, default=1, help="packed sequences (samples with --batch-tokens 0) per step")
    cli.add_argument("--batch-tokens", type=int, help="tokens per packed sequence (BATCH_TOKENS); 0 = no packing")
    cli.add_argument("--max-seq-length", type=int)
    cli.add_argument("--no-8bit", action="store_true", help="load the base model dense (overrides LOAD_IN_8BIT and QUANT)")
    cli.add_argument("--lora-dropout", type=float, default=0.1, help="LoRA dropout (0.1 as specified; 0 for exact comparisons)")
    ns = cli.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    settings = get_settings()
    if ns.no_8bit:
        settings = settings.model_copy(update={"LOAD_IN_8BIT": False, "QUANT": "none"})
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
    stored = store.load_speaker(settings.DATA_DIR, request.speaker)
    if stored is None or not stored.messages:
        print(f"error: no messages stored for {request.speaker!r} in {settings.DATA_DIR}; upload a dialog first", file=sys.stderr)
        return 1
    config = resolve_config(settings, request).model_copy(update={"lora_dropout": ns.lora_dropout})
    evaluate = evals.after_training(settings, request.speaker, config) if settings.EVALUATE_AFTER_TRAINING else None
    try:
        outcome = train_lora(stored.messages, request.speaker, config, settings.OUTPUT_DIR, settings.MODELS_DIR,
                             progress_bar=True, evaluate=evaluate)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not base_model.is_main_process():
        return 0
    summary = {k: v for k, v in outcome.info.items() if k not in ("loss_history", "heldout_ids")}
    if outcome.evaluation is not None:
        summary["evaluation"] = evals.summary(outcome.evaluation)
    print(json.dumps({"message": f"Training completed successfully for {request.speaker}", "model_path": str(outcome.model_path), **summary}, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
