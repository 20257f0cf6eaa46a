"""Tiny random models for tests, built in-process from configs (no Hub)."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "Привіт! Як справи? Все добре, дякую. Підемо кави вип'ємо?",
    "Hello, how are you? Fine, thanks. Let's get coffee!",
    "Олена, José, User1, User2: так, ні, можливо, завтра, сьогодні.",
    "<start_of_turn>user\n<end_of_turn>\n<start_of_turn>model\nassistant: user: 0123456789 .,!?",
]
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def build_tokenizer(texts: list[str] | None = None, vocab_size: int = 400):
    """A byte-level BPE tokenizer with Gemma's special tokens, trained here on `texts` (CORPUS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4 if texts is None else texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


def random_model(config, tokenizer, path: Path, seed: int = 0, device: str = "cpu", dtype=None) -> Path:
    """A model of `config` with seeded random weights, built on `device` in `dtype` (float32), saved
    with `tokenizer` to `path`. Also the benchmarks' random models (bench/train_throughput.py)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_model(path: Path, arch: str = "gemma3", **overrides) -> Path:
    """A tiny random model of `arch`; `overrides` change its config."""
    tokenizer = build_tokenizer()
    common = dict(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if arch == "gemma3":
        from transformers import Gemma3TextConfig as Config

        config = Config(**{**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, sliding_window=64), **common, **overrides})
    elif arch == "llama":
        from transformers import LlamaConfig as Config

        config = Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=1024, **common, **overrides)
    elif arch == "gpt2":  # no q_proj / v_proj
        from transformers import GPT2Config as Config

        config = Config(n_embd=64, n_layer=2, n_head=4, n_positions=1024, **common, **overrides)
    else:
        raise ValueError(arch)
    return random_model(config, tokenizer, path)


def save_tiny_gguf(folder: Path, out: Path) -> Path:
    """The gemma3 checkpoint in `folder` (float32, byte-level BPE tokenizer) as a llama.cpp GGUF at `out`,
    written as llama.cpp's convert_hf_to_gguf.py writes Gemma 3 (conversion/gemma.py): its metadata,
    tensors renamed by the gguf package's map, Gemma's RMSNorm weights shifted by 1 (transformers
    computes x * (1 + w), llama.cpp x * w), the tokenizer as a "gpt2" vocabulary with its merges."""
    import json

    import gguf
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    tok = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    n_layers = config["num_hidden_layers"]
    writer = gguf.GGUFWriter(str(out), "gemma3")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_parameters"]["full_attention"]["rope_theta"])
    writer.add_rope_freq_base_swa(config["rope_parameters"]["sliding_attention"]["rope_theta"])
    writer.add_sliding_window(config["sliding_window"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    tokens = [""] * config["vocab_size"]
    types = [gguf.TokenType.NORMAL] * config["vocab_size"]
    for text, i in tok["model"]["vocab"].items():
        tokens[i] = text
    for added in tok["added_tokens"]:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, n_layers)
    for name, tensor in load_file(str(folder / "model.safetensors")).items():
        if name == "lm_head.weight":  # tied to the embeddings, as llama.cpp takes them when absent
            continue
        data = tensor.float().numpy()
        if name.endswith("norm.weight"):
            data = data + 1.0
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
