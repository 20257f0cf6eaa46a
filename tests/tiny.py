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


def save_tiny_model(path: Path, arch: str = "gemma3") -> Path:
    tokenizer = build_tokenizer()
    common = dict(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if arch == "gemma3":
        from transformers import Gemma3TextConfig as Config

        config = Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, sliding_window=64, **common)
    elif arch == "llama":
        from transformers import LlamaConfig as Config

        config = Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=1024, **common)
    elif arch == "gpt2":  # no q_proj / v_proj
        from transformers import GPT2Config as Config

        config = Config(n_embd=64, n_layer=2, n_head=4, n_positions=1024, **common)
    else:
        raise ValueError(arch)
    return random_model(config, tokenizer, path)
