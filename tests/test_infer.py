"""Generation: adapter switching on one base, the LRU cache, stale reloads, streaming."""

from __future__ import annotations

from pathlib import Path

import pytest

import train
from config import Settings
from lm.chat_format import to_messages
from lm.infer import AdapterNotFound, Decoding, PersonaEngine
from models import TrainRequest, Turn
from parser import build_samples


def train_speaker(base: Path, out: Path, speaker: str, reply: str, epochs: int = 15):
    dialog = []
    for i in range(4):
        dialog += [Turn(speaker="Q", content=f"питання {i}"), Turn(speaker=speaker, content=reply)]
    samples, _ = build_samples(dialog, speaker, 2)
    config = train.resolve_config(Settings(BASE_MODEL=str(base), DEVICE="cpu", LOAD_IN_8BIT=False),
                                  TrainRequest(speaker=speaker, epochs=epochs, learning_rate=0.02))
    return train.train_lora(samples, speaker, config, out, out.parent / "models")


@pytest.fixture(scope="module")
def adapters(tiny_gemma, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapters") / "output_lora"
    train_speaker(tiny_gemma, out, "Ann", "так так так так так")
    train_speaker(tiny_gemma, out, "Bob", "ні ні ні ні ні")
    return out


def engine(tiny_gemma, out, cache_size=2):
    return PersonaEngine(str(tiny_gemma), out.parent / "models", out, "cpu", False, cache_size)


PROMPT = to_messages([Turn(speaker="Q", content="питання 1")], "Ann")


def test_each_adapter_answers_in_its_own_voice(tiny_gemma, adapters):
    e = engine(tiny_gemma, adapters)
    ann = e.generate("Ann", PROMPT, Decoding(max_new_tokens=8))
    bob = e.generate("Bob", PROMPT, Decoding(max_new_tokens=8))
    base = e.generate(None, PROMPT, Decoding(max_new_tokens=8))
    assert "так" in ann.text and "ні" in bob.text
    assert len({ann.text, bob.text, base.text}) == 3
    assert e.generate("Ann", PROMPT, Decoding(max_new_tokens=8)).text == ann.text  # switching back is exact
    assert ann.prompt_tokens > 0 and 0 < ann.completion_tokens <= 8


def test_lru_cache_evicts_the_least_recent(tiny_gemma, adapters):
    e = engine(tiny_gemma, adapters, cache_size=1)
    first = e.generate("Ann", PROMPT, Decoding(max_new_tokens=6)).text
    e.generate("Bob", PROMPT, Decoding(max_new_tokens=6))
    assert e.cached_speakers() == ["Bob"]
    assert set(e._model.peft_config) == {e._cache["Bob"][0]}  # Ann's weights left the model
    assert e.generate("Ann", PROMPT, Decoding(max_new_tokens=6)).text == first
    assert e.cached_speakers() == ["Ann"]


def test_retrained_adapter_is_reloaded_not_served_stale(tiny_gemma, adapters, tmp_path):
    out = tmp_path / "output_lora"
    train_speaker(tiny_gemma, out, "Ann", "так так так так так")
    e = engine(tiny_gemma, out)
    before = e.generate("Ann", PROMPT, Decoding(max_new_tokens=8)).text
    train_speaker(tiny_gemma, out, "Ann", "ні ні ні ні ні")  # retrained while cached
    after = e.generate("Ann", PROMPT, Decoding(max_new_tokens=8)).text
    assert "так" in before and "ні" in after
    assert len(e._model.peft_config) == 1


def test_streaming_yields_the_same_text(tiny_gemma, adapters):
    e = engine(tiny_gemma, adapters)
    whole = e.generate("Bob", PROMPT, Decoding(max_new_tokens=8)).text
    *pieces, end = list(e.stream("Bob", PROMPT, Decoding(max_new_tokens=8)))
    assert len(pieces) >= 1 and "".join(pieces).strip() == whole == end.text
    assert (end.completion_tokens, end.finish_reason) == (e.generate("Bob", PROMPT, Decoding(max_new_tokens=8)).completion_tokens,
                                                         e.generate("Bob", PROMPT, Decoding(max_new_tokens=8)).finish_reason)
    cut = e.generate("Bob", PROMPT, Decoding(max_new_tokens=1))
    *_, cut_end = e.stream("Bob", PROMPT, Decoding(max_new_tokens=1))
    assert cut.completion_tokens == 1 and cut.finish_reason == cut_end.finish_reason == "length"  # cut, not ended


def test_unknown_speaker(tiny_gemma, adapters):
    with pytest.raises(AdapterNotFound):
        engine(tiny_gemma, adapters).generate("Nobody", PROMPT, Decoding())


def test_stop_strings_end_the_reply_and_never_reach_the_client():
    from lm.infer import _StopCutter

    cutter = _StopCutter(["\nBob:", "###"])
    pieces = [" Hello", " there", "\nB", "ob: hi", " more"]
    out = "".join(cutter.feed(p) for p in pieces) + cutter.flush()
    assert out == "Hello there" and cutter.stopped
    cutter = _StopCutter(["\nBob:"])
    out = "".join(cutter.feed(p) for p in ["a\n", "Bo", "ss is here"]) + cutter.flush()
    assert out == "a\nBoss is here" and not cutter.stopped  # a held-back prefix that was not a stop is sent


def test_persona_decoding_stops_at_anyone_elses_turn():
    from lm.infer import persona_decoding

    settings = Settings()
    decoding = persona_decoding(settings, [Turn(speaker="Bob", content="hi"), Turn(speaker="Ann", content="yo")],
                                temperature=None, stop=["END"], max_new_tokens=9)
    assert decoding.stop == ["END", "\nBob:", "\nAnn:"]
    assert (decoding.temperature, decoding.top_p, decoding.repetition_penalty, decoding.max_new_tokens) == (
        settings.GENERATION_TEMPERATURE, settings.GENERATION_TOP_P, settings.GENERATION_REPETITION_PENALTY, 9)


def test_a_stop_string_cuts_generation(tiny_gemma, adapters):
    e = engine(tiny_gemma, adapters)
    whole = e.generate("Ann", PROMPT, Decoding(max_new_tokens=8))
    word = whole.text.split()[1]
    cut = e.generate("Ann", PROMPT, Decoding(max_new_tokens=8, stop=[word]))
    assert word not in cut.text and whole.text.startswith(cut.text) and cut.finish_reason == "stop"
    *pieces, end = e.stream("Ann", PROMPT, Decoding(max_new_tokens=8, stop=[word]))
    assert "".join(pieces).strip() == end.text == cut.text and end.finish_reason == "stop"


def test_the_repetition_penalty_counts_the_reply_not_the_prompt(tiny_gemma, adapters):
    """Over the prompt, the penalty also lowered the line end, the speakers' names and every word the
    conversation used (on Earnest's Jack, the base's replies ran 3.4x the person's length with it, 1.0x
    without). The first token's scores are the unpenalised ones; later tokens are penalised."""
    import torch

    from lm import infer

    e = engine(tiny_gemma, adapters)
    with e.session("Ann") as (model, tokenizer, template):
        ids, mask, _ = infer._inputs(model, tokenizer, template, PROMPT, "Ann", Decoding(max_new_tokens=4))

        def scores(penalty: float):
            kwargs = infer._generate_kwargs(tokenizer, template, Decoding(max_new_tokens=4, repetition_penalty=penalty),
                                            ids.shape[1])
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True,
                                     **kwargs)
            return out.scores, out.sequences[0, ids.shape[1]:]

        plain, tokens = scores(1.0)
        penalised, same_tokens = scores(100.0)
    prompt_only = sorted(set(ids[0].tolist()) - set(tokens.tolist()))
    assert torch.equal(plain[0], penalised[0])  # nothing generated yet: no penalty, whatever the prompt holds
    assert prompt_only and torch.equal(plain[1][0, prompt_only], penalised[1][0, prompt_only])
    first = tokens[0].item()
    assert same_tokens[0].item() == first  # greedy, and the same first scores
    assert penalised[1][0, first] < plain[1][0, first]  # the reply's own token is penalised


def test_a_prompt_longer_than_the_bound_keeps_its_latest_turns(tiny_gemma):
    """Issue 29, defect 6: as training drops the oldest context turns, so does generation."""
    from lm import base_model, chat_format

    tokenizer = base_model.load_tokenizer(tiny_gemma)
    template, _ = chat_format.chat_template_for(tokenizer)
    turns = [Turn(speaker="Q" if i % 2 == 0 else "Ann", content=f"turn{i} " + "слово " * 50) for i in range(32)]
    messages = to_messages(turns, "Ann")
    whole, none_dropped = chat_format.bounded_prompt_ids(tokenizer, template, messages, "Ann", 10**6)
    assert none_dropped == 0
    ids, dropped = chat_format.bounded_prompt_ids(tokenizer, template, messages, "Ann", len(whole) // 4)
    text = tokenizer.decode(ids)
    assert len(ids) <= len(whole) // 4 and 0 < dropped < 32
    assert f"turn{dropped} " in text and f"turn{dropped - 1} " not in text and "turn31 " in text  # the latest, whole turns
    assert ids == chat_format.bounded_prompt_ids(tokenizer, template, to_messages(turns[dropped:], "Ann"), "Ann", 10**6)[0]
    one, _ = chat_format.bounded_prompt_ids(tokenizer, template, messages, "Ann", 20)  # the last turn alone is too long
    assert len(one) == 20 and one[0] == tokenizer.bos_token_id and tokenizer.decode(one).endswith("Ann:")


@pytest.mark.parametrize("ends_with", ["eos", "newline"])
def test_a_reply_is_never_empty_even_when_the_model_would_end_it_at_once(tiny_gemma, ends_with):
    """The model is biased to end its turn first (EOS, or the line end that ends a transcript's turn):
    the reply still has a visible token, and it ends where the model ends it after that."""
    import torch
    from transformers import AutoModelForCausalLM

    from lm import base_model, chat_format
    from lm.infer import generate

    tok = base_model.load_tokenizer(str(tiny_gemma))
    template, _ = chat_format.chat_template_for(tok)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_gemma)).eval()
    end = tok.eos_token_id if ends_with == "eos" else tok.convert_tokens_to_ids("Ċ")  # byte-level BPE's "\n"
    assert tok.decode([end], skip_special_tokens=False) in ("<eos>", "\n")

    def bias(module, args, output):
        output[..., end] += 50.0  # the end of the turn, far above every other token
        return output

    model.lm_head.register_forward_hook(bias)
    prompt = tok(chat_format.prompt_text(tok, template, PROMPT, "Ann"), add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        assert int(model(**prompt).logits[0, -1].argmax()) == end  # unguarded, the reply would be empty
    for decoding in (Decoding(max_new_tokens=8), Decoding(max_new_tokens=8, temperature=0.9, seed=3)):
        reply = generate(model, tok, template, PROMPT, decoding, "Ann")
        assert reply.text.strip() and reply.completion_tokens >= 2
        assert reply.finish_reason == "stop"  # it ended its turn right after the visible token
