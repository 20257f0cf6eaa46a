"""Formatting and LoRA training on tiny random models: what is supervised, what changes, what is kept."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

import train
from config import Settings
from errors import TrainingError
from lm import adapters, base_model, chat_format
from models import Sample, TrainRequest, Turn
from parser import build_samples

DIALOG = [
    Turn(speaker="User1", content="Привіт! Як справи?"),
    Turn(speaker="User2", content="Все добре, дякую."),
    Turn(speaker="User1", content="Підемо кави вип'ємо?"),
]


def make_sample(context, reply):
    turns = [Turn(speaker=s, content=c) for s, c in context]
    return Sample(id="x", context=turns, reply=reply, added_at=datetime.now(timezone.utc))


def config_for(base: Path, **overrides) -> train.TrainConfig:
    settings = Settings(BASE_MODEL=str(base), DEVICE="cpu", **{k: v for k, v in overrides.items() if k.isupper()})
    request = TrainRequest(speaker="User1", **{k: v for k, v in overrides.items() if not k.isupper()})
    return train.resolve_config(settings, request)


@pytest.fixture(scope="module")
def gemma_tok(tiny_gemma):
    tok = base_model.load_tokenizer(str(tiny_gemma))
    template, source = chat_format.chat_template_for(tok)
    assert (template, source) == (chat_format.TRANSCRIPT_TEMPLATE, chat_format.TRANSCRIPT_SOURCE)  # it ships none
    return tok, template


# Gemma's official turn format, as an instruction-tuned checkpoint ships it.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


# --- formatting -------------------------------------------------------------------------------


def roles(messages):
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def test_to_messages_alternates_and_maps_roles():
    sample = make_sample([("User1", "a"), ("User1", "b"), ("User2", "c"), ("User1", "d")], "e")
    messages = chat_format.to_messages(sample.context, "User1", sample.reply)
    assert roles(messages) == [
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "a\nb"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "e"},
    ]
    assert messages[1]["turns"] == [{"name": "User1", "text": "a"}, {"name": "User1", "text": "b"}]
    assert messages[0]["turns"] == messages[4]["turns"] == []  # inserted for alternation: no line in a transcript


def test_to_messages_names_others_in_group_chats():
    sample = make_sample([("Bob", "hi"), ("Eve", "yo")], "hey")
    first = chat_format.to_messages(sample.context, "Ann", sample.reply)[0]
    assert roles([first]) == [{"role": "user", "content": "Bob: hi\nEve: yo"}]


def test_transcript_supervises_the_reply_and_its_line_end(gemma_tok):
    tok, template = gemma_tok
    samples, _ = build_samples(DIALOG, "User1", 6)
    enc = chat_format.format_sample(samples[1], "User1", tok, template, 512)
    supervised = [t for t, label in zip(enc.input_ids, enc.labels) if label != -100]
    assert supervised == [label for label in enc.labels if label != -100]
    assert tok.decode(supervised) == " Підемо кави вип'ємо?\n"
    prompt = tok.decode(enc.input_ids[: enc.labels.index(supervised[0])])
    assert prompt == "<bos>User1: Привіт! Як справи?\nUser2: Все добре, дякую.\nUser1:"
    # Supervised positions are exactly one contiguous block at the end.
    first = next(i for i, label in enumerate(enc.labels) if label != -100)
    assert all(label != -100 for label in enc.labels[first:])
    # A turn's own line breaks do not end it early in a transcript.
    multi = make_sample([("User2", "one\ntwo")], "three")
    assert tok.decode(chat_format.format_sample(multi, "User1", tok, template, 512).input_ids) == "<bos>User2: one two\nUser1: three\n"


def test_a_shipped_chat_template_supervises_its_end_of_turn(tiny_gemma):
    tok = base_model.load_tokenizer(str(tiny_gemma))
    tok.chat_template = GEMMA_CHAT_TEMPLATE
    template, source = chat_format.chat_template_for(tok)
    assert (template, source) == (GEMMA_CHAT_TEMPLATE, "tokenizer")
    samples, _ = build_samples(DIALOG, "User1", 6)
    enc = chat_format.format_sample(samples[1], "User1", tok, template, 512)
    assert tok.decode([t for t in enc.labels if t != -100]) == "Підемо кави вип'ємо?<end_of_turn>\n"
    prompt = tok.decode(enc.input_ids[: enc.labels.index(next(t for t in enc.labels if t != -100))])
    assert prompt == (
        "<bos><start_of_turn>user\n<end_of_turn>\n<start_of_turn>model\nПривіт! Як справи?<end_of_turn>\n"
        "<start_of_turn>user\nВсе добре, дякую.<end_of_turn>\n<start_of_turn>model\n"
    )


def test_long_context_drops_oldest_turns(gemma_tok):
    tok, template = gemma_tok
    context = [("User2" if i % 2 else "User1", f"turn number {i} " * 5) for i in range(10)]
    sample = make_sample(context, "the reply")
    full = chat_format.format_sample(sample, "User1", tok, template, 4096)
    short = chat_format.format_sample(sample, "User1", tok, template, len(full.input_ids) // 2)
    assert short.context_turns_dropped > 0
    assert len(short.input_ids) <= len(full.input_ids) // 2
    assert tok.decode([t for t in short.labels if t != -100]) == " the reply\n"
    assert "turn number 9" in tok.decode(short.input_ids) and "turn number 0" not in tok.decode(short.input_ids)


def test_overlong_reply_is_cut_and_unfittable_sample_dropped(gemma_tok):
    tok, template = gemma_tok
    sample = make_sample([], "слово " * 200)
    enc = chat_format.format_sample(sample, "User1", tok, template, 32)
    assert len(enc.input_ids) == 32 and enc.labels[-1] != -100
    # A budget smaller than the prompt itself leaves no reply token: dropped.
    assert chat_format.format_sample(sample, "User1", tok, template, 3) is None


def test_transcript_for_any_template_less_model_and_the_tokenizers_own_template(tiny_llama):
    tok = base_model.load_tokenizer(str(tiny_llama))
    template, source = chat_format.chat_template_for(tok)
    assert source == chat_format.TRANSCRIPT_SOURCE
    enc = chat_format.format_sample(make_sample([("User2", "hi")], "hello"), "User1", tok, template, 512)
    assert tok.decode(enc.input_ids) == "<bos>User2: hi\nUser1: hello\n"
    assert tok.decode([t for t in enc.labels if t != -100]) == " hello\n"
    # Clients that send plain OpenAI messages get one line per message, named by role.
    plain = tok.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=template, tokenize=False,
                                    add_generation_prompt=True, assistant_name="Ann")
    assert plain == "<bos>user: hi\nAnn:"
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    assert chat_format.chat_template_for(tok) == (tok.chat_template, "tokenizer")


# --- training ---------------------------------------------------------------------------------


class Snapshot(TrainerCallback):
    """Records the model's parameters before and after training."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.before.update({n: b.detach().clone() for n, b in model.named_buffers()})

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.after.update({n: b.detach().clone() for n, b in model.named_buffers()})


@pytest.mark.parametrize("quant", [{"LOAD_IN_8BIT": True}, {"LOAD_IN_8BIT": False}, {"QUANT": "4bit"}],
                         ids=["8bit", "dense", "4bit"])
def test_training_changes_only_lora_weights_and_reloads(tiny_gemma, tmp_path, quant):
    from peft import PeftModel
    from safetensors.torch import load_file

    samples, _ = build_samples(DIALOG, "User1", 6)
    config = config_for(tiny_gemma, **quant, epochs=3, learning_rate=1e-2)
    load_in_8bit = config.load_in_8bit
    snap = Snapshot()
    out = train.train_lora(samples, "User1", config, tmp_path / "out", tmp_path / "models", callbacks=[snap])

    lora = [n for n in snap.before if "lora_" in n]
    assert lora and all("q_proj" in n or "v_proj" in n for n in lora)
    assert any(not torch.equal(snap.before[n], snap.after[n]) for n in lora if "lora_B" in n)
    frozen = [n for n in snap.before if "lora_" not in n]
    assert all(torch.equal(snap.before[n], snap.after[n]) for n in frozen)
    if "LOAD_IN_8BIT" in quant and load_in_8bit:
        assert any(snap.before[n].dtype == torch.int8 for n in frozen), "base was not loaded in 8-bit"
    if "QUANT" in quant:  # NF4: two 4-bit weights packed per uint8
        assert any(snap.before[n].dtype == torch.uint8 for n in frozen), "base was not loaded in 4-bit"

    folder = tmp_path / "out" / "User1"
    assert out.model_path == folder
    assert {"adapter_config.json", "adapter_model.safetensors", "training_info.json", "tokenizer_config.json"} <= {
        p.name for p in folder.iterdir()
    }
    info = json.loads((folder / "training_info.json").read_text())
    assert info["config"]["lora_r"] == 8 and info["config"]["lora_alpha"] == 16
    assert info["config"]["target_modules"] == ["q_proj", "v_proj"] and info["config"]["lora_dropout"] == 0.1
    assert info["config"]["load_in_8bit"] is load_in_8bit and info["config"]["quant"] == quant.get("QUANT")
    # packed by default, but two samples are too few to share a step (MIN_STEPS_PER_EPOCH)
    assert info["num_samples"] == 2 and info["packed_sequences"] == 2 and info["steps"] == 6 and info["final_loss"] > 0
    assert info["supervised_tokens"] < info["total_tokens"]
    assert list((tmp_path / "out").iterdir()) == [folder]

    # The saved adapter reloads onto a fresh base and equals the trained LoRA weights.
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_gemma))
    ids = torch.tensor([[2, 10, 20, 30, 40]])
    with torch.no_grad():
        base_logits = base(ids).logits
    model = PeftModel.from_pretrained(base, str(folder))
    saved = load_file(str(folder / "adapter_model.safetensors"))
    loaded = dict(model.named_parameters())
    for name, tensor in saved.items():
        live = name.replace(".weight", ".default.weight")
        assert torch.equal(loaded[live].detach(), tensor)
        assert torch.equal(snap.after[live].float(), tensor.float())
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base_logits)


@pytest.mark.parametrize("settings, weights", [
    ({"LOAD_IN_8BIT": True}, "8-bit, dequantized to float32"),
    ({"QUANT": "4bit"}, "4-bit, dequantized to float32"),
    ({"QUANT": "none"}, "float32"),  # QUANT wins over LOAD_IN_8BIT (true by default)
])
def test_quantized_base_is_dequantized_before_evaluating_on_the_cpu(tiny_gemma, tmp_path, settings, weights):
    from lm import evals

    samples, _ = build_samples(DIALOG * 4, "User1", 6)
    seen = []
    evaluate = lambda model, *rest: seen.append(evals.weights_of(model)) or {}  # noqa: E731
    out = train.train_lora(samples, "User1", config_for(tiny_gemma, **settings, max_steps=1), tmp_path / "out",
                           tmp_path / "models", evaluate=evaluate)
    assert out.evaluation_error is None and seen == [weights]


def test_failed_run_leaves_previous_adapter_intact(tiny_gemma, tmp_path):
    samples, _ = build_samples(DIALOG, "User1", 6)
    config = config_for(tiny_gemma, LOAD_IN_8BIT=False)
    train.train_lora(samples, "User1", config, tmp_path / "out", tmp_path / "models")
    folder = tmp_path / "out" / "User1"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    class Boom(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            raise RuntimeError("simulated crash mid-training")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train.train_lora(samples, "User1", config, tmp_path / "out", tmp_path / "models", callbacks=[Boom()])
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["User1"]

    stop = threading.Event()
    stop.set()
    with pytest.raises(train.TrainingStopped):
        train.train_lora(samples, "User1", config, tmp_path / "out", tmp_path / "models", stop=stop)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_stale_folders_are_cleaned_and_interrupted_swap_restored(tmp_path):
    (tmp_path / ".tmp-User1-abcd1234").mkdir()
    (tmp_path / ".tmp-deleted-Cy-0a0b0c0d").mkdir()  # an interrupted delete, as older versions named it
    (tmp_path / ".del-Cy-0a0b0c0d").mkdir()
    (tmp_path / ".old-Ann-12345678").mkdir()
    (tmp_path / ".old-Ann-12345678" / "adapter_config.json").write_text("{}")
    (tmp_path / "Bob").mkdir()
    (tmp_path / ".old-Bob-87654321").mkdir()
    adapters.clean_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Ann", "Bob"]
    assert (tmp_path / "Ann" / "adapter_config.json").exists()


def test_model_without_q_v_proj_fails_clearly(tiny_gpt2, tmp_path):
    samples, _ = build_samples(DIALOG, "User1", 6)
    with pytest.raises(TrainingError, match="has no q_proj or v_proj modules"):
        train.train_lora(samples, "User1", config_for(tiny_gpt2), tmp_path / "out", tmp_path / "models")
    assert not (tmp_path / "out" / "User1").exists()


def test_unloadable_base_model_fails_clearly(tmp_path):
    samples, _ = build_samples(DIALOG, "User1", 6)
    with pytest.raises(TrainingError, match="could not load base model"):
        train.train_lora(samples, "User1", config_for(tmp_path / "no-such-model"), tmp_path / "out", tmp_path / "models")


def test_request_overrides_settings(tiny_gemma):
    settings = Settings(BASE_MODEL=str(tiny_gemma), LEARNING_RATE=1e-3, MAX_SEQ_LENGTH=256, DEVICE="cpu")
    config = train.resolve_config(settings, TrainRequest(speaker="A", learning_rate=5e-4, batch_size=4))
    assert (config.learning_rate, config.max_seq_length, config.batch_size, config.epochs) == (5e-4, 256, 4, None)
    assert (config.lora_r, config.lora_alpha, config.lora_dropout) == (8, 16, 0.1)


def test_epochs_adapt_to_the_amount_of_data():
    assert train.auto_epochs(36) == round(train.AUTO_SAMPLE_PASSES / 36, 2) > 5
    assert train.auto_epochs(2) == train.AUTO_MAX_EPOCHS
    assert train.auto_epochs(train.AUTO_SAMPLE_PASSES) == train.auto_epochs(5000) == 1.0
    config = train.resolve_config(Settings(), TrainRequest(speaker="A"))
    assert config.epochs is None  # chosen by the run, from its data
    assert train.resolve_config(Settings(EPOCHS=3), TrainRequest(speaker="A")).epochs == 3
    assert train.resolve_config(Settings(EPOCHS=3), TrainRequest(speaker="A", epochs=2)).epochs == 2


@pytest.mark.parametrize("arch", ["gemma", "llama"])
def test_the_torch_free_tokenizer_renders_exactly_like_the_full_one(arch, tiny_gemma, tiny_llama):
    folder = tiny_gemma if arch == "gemma" else tiny_llama
    full, light = base_model.load_tokenizer(str(folder)), base_model.text_tokenizer(str(folder), folder.parent)
    assert isinstance(light, base_model.TextTokenizer)
    samples, _ = build_samples(DIALOG, "User1", 6)
    for template in (chat_format.chat_template_for(full)[0], GEMMA_CHAT_TEMPLATE):
        assert (chat_format.render_samples(samples, "User1", light, template, 512)
                == chat_format.render_samples(samples, "User1", full, template, 512))


def test_rendering_the_dataset_imports_no_torch(tiny_gemma):
    import subprocess
    import sys

    code = ("import sys, train, parser; from models import Turn; "
            "s, _ = parser.build_samples([Turn(speaker='A', content='hi'), Turn(speaker='B', content='yo')], 'B', 4); "
            f"r = train.render_dataset(s, 'B', {str(tiny_gemma)!r}, None, 64); "
            "assert r['data'] and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:3]")
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


def test_the_best_pass_by_held_out_loss_is_kept_and_training_stops_when_it_stops_improving(tiny_gemma, tmp_path):
    """A rate far too high makes later passes worse on the held-out samples: the adapter written is
    the best pass's, and training stops `patience` passes after it."""
    from lm import packing

    dialog = [t for i in range(30) for t in (Turn(speaker="User2", content=f"скільки {i}?"), Turn(speaker="User1", content=f"{i} 🌻!"))]
    samples, _ = build_samples(dialog, "User1", 2)
    config = config_for(tiny_gemma, epochs=8, learning_rate=0.05, KEEP_BEST_PATIENCE=1, LOAD_IN_8BIT=False)
    out = train.train_lora(samples, "User1", config, tmp_path / "out", tmp_path / "models")
    passes = out.info["passes"]
    losses, kept = passes["held_out_loss"], passes["kept"]
    assert kept == min(range(1, len(losses)), key=losses.__getitem__)  # pass 0 is the base
    ran = len(losses) - 1
    assert ran == 8 or (passes["stopped_early"] and ran == kept + 1)
    # The saved adapter is the kept pass: its held-out loss, computed afresh, is that pass's.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    held = [s for s in samples if s.id in set(out.info["heldout_ids"])]
    tok = base_model.load_tokenizer(str(tiny_gemma))
    template, _ = chat_format.chat_template_for(tok)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_gemma)), str(out.model_path))
    total, tokens = packing.loss_sums(model, chat_format.encode_all(held, "User1", tok, template, 512))
    assert round(total / tokens, 4) == pytest.approx(losses[kept], abs=2e-3)
    print("passes", passes)


def test_no_passes_to_choose_from_without_held_out_samples_or_with_it_off(tiny_gemma, tmp_path):
    samples, _ = build_samples(DIALOG * 2, "User1", 2)
    out = train.train_lora(samples, "User1", config_for(tiny_gemma, epochs=2, max_steps=2, LOAD_IN_8BIT=False),
                           tmp_path / "out", tmp_path / "models")
    assert "passes" not in out.info  # too few samples to hold any out
    assert config_for(tiny_gemma, KEEP_BEST_PATIENCE=0).keep_best_patience == 0
    assert config_for(tiny_gemma).keep_best_patience == 2


def test_lora_capacity_is_set_in_settings_resolved_and_logged(tiny_gemma, caplog):
    default = config_for(tiny_gemma)
    assert (default.lora_r, default.lora_alpha, default.target_modules) == (8, 16, ["q_proj", "v_proj"])
    with caplog.at_level("INFO", logger="persona_lora.train"):
        wider = config_for(tiny_gemma, LORA_R=32, LORA_TARGET_MODULES="q_proj, k_proj,v_proj,o_proj")
    assert (wider.lora_r, wider.lora_alpha, wider.target_modules) == (32, 64, ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert "set in settings: ['LORA_R', 'LORA_TARGET_MODULES']" in caplog.text
    assert config_for(tiny_gemma, LORA_R=4, LORA_ALPHA=32).lora_alpha == 32  # alpha set: not 2 × r


def test_all_linear_adapts_every_linear_layer(tiny_gpt2, tmp_path):
    """'all-linear' (peft's shorthand) reaches layers q_proj/v_proj would miss: GPT-2 has neither."""
    samples, _ = build_samples(DIALOG * 2, "User1", 2)
    config = config_for(tiny_gpt2, LORA_TARGET_MODULES="all-linear", LORA_R=4, max_steps=1, LOAD_IN_8BIT=False)
    out = train.train_lora(samples, "User1", config, tmp_path / "out", tmp_path / "models")
    adapter = json.loads((out.model_path / "adapter_config.json").read_text())
    assert {m.rsplit(".", 1)[-1] for m in adapter["target_modules"]} == {"c_attn", "c_proj", "c_fc"}  # attention and MLP
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8
    assert out.info["config"]["target_modules"] == ["all-linear"]
