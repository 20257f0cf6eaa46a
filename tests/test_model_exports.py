"""Exports of a trained adapter for other servers (lm/export.py, api/model_exports.py): the merged model
loads without peft and computes what base+adapter computes; the GGUF LoRA is what llama.cpp loads,
and with it llama.cpp's loss on the speaker's held-out replies falls as transformers' does; every
adapter written meets vLLM's LoRA constraints."""

from __future__ import annotations

import json
import math
import os
import zipfile
from pathlib import Path

import pytest
import tiny
import torch

import train
from config import DEFAULT_BASE_MODEL, Settings
from lm import base_model
from lm import export as model_export
from lm.chat_format import TRANSCRIPT_TEMPLATE, encode_all
from models import TrainRequest, Turn
from parser import build_samples

SPEAKER = "Олена"
QUESTIONS = ["Підемо на каву?", "Коли зустрінемось?", "Ти вже вдома?", "Що робиш увечері?", "Як справи на роботі?",
             "Бачила новий фільм?", "Купиш хліба?", "Де ти зараз?", "Подзвониш мені?", "Все добре?"]


def dialog() -> list[Turn]:
    """40 exchanges where Олена always answers the same way: a style an adapter learns in a few steps."""
    turns = []
    for i in range(40):
        turns.append(Turn(speaker="Петро", content=QUESTIONS[i % len(QUESTIONS)]))
        turns.append(Turn(speaker=SPEAKER, content=f"ага, давай о {i % 10 + 1}! до зустрічі"))
    return turns


@pytest.fixture(scope="module")
def llamacpp_gemma(tmp_path_factory) -> Path:
    """A tiny gemma3 that llama.cpp computes the same as transformers: llama.cpp scales queries by
    1/sqrt(head_dim) (gemma3.cpp: f_attention_scale) where transformers takes query_pre_attn_scalar,
    and every layer attends within its window (set wider than any sample)."""
    return tiny.save_tiny_model(tmp_path_factory.mktemp("tiny-gemma3-gguf"), "gemma3", query_pre_attn_scalar=16,
                                sliding_window=1024)


@pytest.fixture(scope="module")
def trained(llamacpp_gemma, tmp_path_factory):
    """(adapter folder, held-out samples, output root): Олена's adapter, trained by train.train_lora."""
    root = tmp_path_factory.mktemp("export-run")
    samples, _ = build_samples(dialog(), SPEAKER, 2)
    settings = Settings(BASE_MODEL=str(llamacpp_gemma), DEVICE="cpu", LOAD_IN_8BIT=False)
    config = train.resolve_config(settings, TrainRequest(speaker=SPEAKER, max_steps=40, learning_rate=1e-2))
    outcome = train.train_lora(samples, SPEAKER, config, root / "output_lora", root / "models")
    info = json.loads((outcome.model_path / "training_info.json").read_text(encoding="utf-8"))
    held_out = [s for s in samples if s.id in set(info["heldout_ids"])]
    assert len(held_out) >= 3
    return outcome.model_path, held_out, root


# --- vLLM ----------------------------------------------------------------------------------------


def test_every_adapter_written_meets_vllms_lora_constraints(trained):
    adapter_dir, _, _ = trained
    assert model_export.vllm_problems(adapter_dir) == []
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["r"] in model_export.VLLM_RANKS and not config.get("modules_to_save")
    # and the defaults every adapter is trained with
    default = train.resolve_config(Settings(DEVICE="cpu"), TrainRequest(speaker=SPEAKER))
    assert default.lora_r in model_export.VLLM_RANKS
    assert set(default.target_modules) <= model_export.VLLM_TARGETS


def test_vllm_problems_name_each_broken_constraint(trained, tmp_path):
    adapter_dir, _, _ = trained
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    config.update(r=4, modules_to_save=["lm_head"], use_dora=True, target_modules=["q_proj", "embed_tokens"])
    (tmp_path / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    problems = model_export.vllm_problems(tmp_path)
    assert problems == [
        "rank r=4 is not one of vLLM's max_lora_rank values [1, 8, 16, 32, 64, 128, 256, 320, 512]",
        "modules_to_save=['lm_head']: vLLM loads LoRA weights only",
        "use_dora=true: vLLM does not serve DoRA adapters",
        "target modules ['embed_tokens'] are not among vLLM's LoRA layers "
        "['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']",
    ]


# --- merged --------------------------------------------------------------------------------------


def test_merged_model_loads_without_peft_and_equals_base_plus_adapter(trained, llamacpp_gemma, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir, held_out, _ = trained
    out = model_export.export_merged(adapter_dir, str(llamacpp_gemma), tmp_path / "exports", SPEAKER)
    assert out == tmp_path / "exports" / SPEAKER / "merged"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", model_export.INFO_FILE} <= names
    assert not any(name.startswith("adapter_") for name in names)  # nothing peft would need
    assert not list(out.parent.glob(".tmp-*"))

    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.chat_template == TRANSCRIPT_TEMPLATE  # the template the adapter was trained with
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(llamacpp_gemma), dtype=torch.float32),
                                           str(adapter_dir)).eval()
    ids = torch.tensor([encode_all(held_out, SPEAKER, tokenizer, TRANSCRIPT_TEMPLATE, 256)[0].input_ids])
    with torch.no_grad():
        want, got = peft_model(input_ids=ids).logits, merged(input_ids=ids).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-3  # the adapter changes the logits ...
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # ... and the merged model computes the same


# --- GGUF ----------------------------------------------------------------------------------------


def test_gguf_adapter_is_a_llama_cpp_lora_named_as_the_base(trained, llamacpp_gemma, tmp_path):
    import gguf
    from safetensors.torch import load_file

    adapter_dir, _, _ = trained
    base_gguf = tiny.save_tiny_gguf(llamacpp_gemma, tmp_path / "base.gguf")
    out = model_export.export_gguf(adapter_dir, str(llamacpp_gemma), str(llamacpp_gemma), tmp_path / "models",
                                   tmp_path / "exports", SPEAKER, base_gguf=base_gguf)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [model_export.ADAPTER_GGUF, "base.gguf", model_export.MODELFILE, model_export.INFO_FILE])

    reader = gguf.GGUFReader(out / model_export.ADAPTER_GGUF)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    assert fields == {"general.architecture": "gemma3", "general.type": "adapter", "adapter.type": "lora",
                      "adapter.lora.alpha": 16.0}
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {f"blk.{i}.attn_{m}.weight.lora_{ab}" for i in range(2) for m in "qv" for ab in "ab"}
    base_names = {t.name for t in gguf.GGUFReader(base_gguf).tensors}
    assert {name.rsplit(".", 1)[0] for name in tensors} <= base_names
    peft = load_file(str(adapter_dir / "adapter_model.safetensors"))
    a = peft["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"].numpy()
    b = peft["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].numpy()
    assert (tensors["blk.1.attn_v.weight.lora_a"].data == a).all()  # [r, in], as llama.cpp wants A
    assert (tensors["blk.1.attn_v.weight.lora_b"].data == b).all()  # [out, r]


def test_modelfile_uses_the_base_the_adapter_and_the_trained_template(trained, llamacpp_gemma, tmp_path):
    adapter_dir, _, _ = trained
    out = model_export.export_gguf(adapter_dir, str(llamacpp_gemma), str(llamacpp_gemma), tmp_path / "models",
                                   tmp_path / "exports", SPEAKER)
    text = (out / model_export.MODELFILE).read_text(encoding="utf-8")
    lines = text.splitlines()
    assert "FROM ./base.gguf" in lines and f"ADAPTER ./{model_export.ADAPTER_GGUF}" in lines
    assert f'{{{{ if eq .Role "assistant" }}}}{SPEAKER}{{{{ else }}}}' in text and text.count(f"{SPEAKER}:") == 1
    assert 'PARAMETER stop "\\n"' in lines
    assert not (out / "base.gguf").exists()  # another base: converted by the user, as the Modelfile's comment says
    assert f"ollama create {model_export.model_name(SPEAKER)} -f Modelfile" in lines[1]  # after the base's note
    assert model_export.model_name(SPEAKER).startswith("persona-") and len(model_export.model_name(SPEAKER)) == 16
    assert (model_export.model_name("José Ñ"), model_export.model_name("User1")) == ("persona-jose-n", "persona-user1")
    gemma = model_export.modelfile("b.gguf", "a.gguf", SPEAKER, "{{ bos_token }}<start_of_turn>user ...")
    assert 'PARAMETER stop "<end_of_turn>"' in gemma and "<start_of_turn>model\n" in gemma


def test_gguf_export_of_an_unsupported_family_says_so(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="no GGUF adapter export for 'llama' models yet"):
        model_export.export_gguf(tmp_path, str(tiny_llama), str(tiny_llama), tmp_path, tmp_path / "exports", SPEAKER)
    assert not (tmp_path / "exports" / SPEAKER / "gguf").exists()


def reply_loss_hf(model, encoded) -> float:
    """Mean NLL per supervised (reply) token, as evals computes it."""
    total, count = 0.0, 0
    with torch.no_grad():
        for e in encoded:
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0].float()
            labels = torch.tensor(e.labels)
            logp = torch.log_softmax(logits[:-1], -1)
            mask = labels[1:] != -100
            total -= logp[mask].gather(1, labels[1:][mask][:, None]).sum().item()
            count += int(mask.sum())
    return total / count



def llama_cpp_or_skip():
    """llama-cpp-python (requirements-gguf.txt); without it the test skips, except under CI (CI=true)."""
    try:
        import llama_cpp  # noqa: F401 - only whether it is there
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("the GGUF export must run in llama.cpp under CI: pip install -r requirements-gguf.txt")
        pytest.skip("llama-cpp-python is not installed (pip install -r requirements-gguf.txt)")

def reply_loss_llama_cpp(llm, encoded) -> float:
    import numpy as np

    total, count = 0.0, 0
    for e in encoded:
        llm.reset()
        llm.eval(e.input_ids)
        logits = np.asarray(llm.scores[: len(e.input_ids)], dtype=np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        for t in range(1, len(e.labels)):
            if e.labels[t] != -100:
                total -= logp[t - 1, e.labels[t]]
                count += 1
    return total / count


def held_out_losses(adapter_dir: Path, base_path: Path, export: Path, base_gguf: str, held_out, threads: int = 1):
    """The mean loss per reply token on the held-out samples without and with the adapter, in
    transformers (float32) and in llama.cpp (the export's GGUFs), on the same token ids."""
    import llama_cpp
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    encoded = encode_all(held_out, SPEAKER, tokenizer, tokenizer.chat_template, 256)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32),
                                      str(adapter_dir)).eval()
    hf_adapter = reply_loss_hf(model, encoded)
    with model.disable_adapter():
        hf_base = reply_loss_hf(model, encoded)

    def llama(lora: Path | None):
        return llama_cpp.Llama(model_path=str(export / base_gguf), lora_path=str(lora) if lora else None, n_ctx=512,
                               logits_all=True, n_threads=threads, verbose=False)

    cpp_base = reply_loss_llama_cpp(llama(None), encoded)
    cpp_adapter = reply_loss_llama_cpp(llama(export / model_export.ADAPTER_GGUF), encoded)
    print(f"held-out reply loss: transformers {hf_base:.5f} -> {hf_adapter:.5f} (ratio {hf_adapter / hf_base:.5f}); "
          f"llama.cpp {cpp_base:.5f} -> {cpp_adapter:.5f} (ratio {cpp_adapter / cpp_base:.5f})")
    return hf_base, hf_adapter, cpp_base, cpp_adapter


def test_llama_cpp_with_the_gguf_adapter_loses_less_on_held_out_replies_as_transformers_does(trained, llamacpp_gemma, tmp_path):
    llama_cpp_or_skip()
    adapter_dir, held_out, _ = trained
    base_gguf = tiny.save_tiny_gguf(llamacpp_gemma, tmp_path / "base.gguf")
    out = model_export.export_gguf(adapter_dir, str(llamacpp_gemma), str(llamacpp_gemma), tmp_path / "models",
                                   tmp_path / "exports", SPEAKER, base_gguf=base_gguf)
    hf_base, hf_adapter, cpp_base, cpp_adapter = held_out_losses(adapter_dir, llamacpp_gemma, out, "base.gguf", held_out)
    assert hf_adapter < 0.95 * hf_base  # the adapter learnt something of Олена's replies (a random 64-wide base: 0.90)
    assert cpp_adapter < cpp_base
    assert math.isclose(cpp_adapter / cpp_base, hf_adapter / hf_base, rel_tol=0.2)
    assert math.isclose(cpp_base, hf_base, rel_tol=0.01)  # the same float32 base, computed by each (measured: 4 digits)


@pytest.mark.real_model
def test_default_model_gguf_export_runs_on_the_packaged_gguf_in_llama_cpp(tmp_path):
    """The default base: its adapter, trained a few steps, on the Q4_K_M GGUF its package ships."""
    llama_cpp_or_skip()
    models_dir = tmp_path / "models"
    base_path = base_model.provision_default_model(models_dir)
    samples, _ = build_samples(dialog(), SPEAKER, 2)
    settings = Settings(DEVICE="cpu", LOAD_IN_8BIT=False, MODELS_DIR=models_dir)
    config = train.resolve_config(settings, TrainRequest(speaker=SPEAKER, max_steps=3, learning_rate=1e-3))
    adapter_dir = train.train_lora(samples, SPEAKER, config, tmp_path / "output_lora", models_dir).model_path
    held = set(json.loads((adapter_dir / "training_info.json").read_text(encoding="utf-8"))["heldout_ids"])

    out = model_export.export_gguf(adapter_dir, str(base_path), DEFAULT_BASE_MODEL, models_dir, tmp_path / "exports", SPEAKER)
    packaged = model_export.default_base_gguf(models_dir)
    assert (out / packaged.name).stat().st_ino == packaged.stat().st_ino  # linked, not copied
    assert f"FROM ./{packaged.name}" in (out / model_export.MODELFILE).read_text(encoding="utf-8")
    hf_base, hf_adapter, cpp_base, cpp_adapter = held_out_losses(
        adapter_dir, base_path, out, packaged.name, [s for s in samples if s.id in held], threads=2)
    assert hf_adapter < 0.9 * hf_base and cpp_adapter < cpp_base
    assert math.isclose(cpp_adapter / cpp_base, hf_adapter / hf_base, rel_tol=0.2)
    assert math.isclose(cpp_base, hf_base, rel_tol=0.05)  # Q4_K_M against its own dequantized copy


# --- the routes ----------------------------------------------------------------------------------


def install_adapter(env, trained) -> Path:
    """Олена's trained adapter, put where the test server looks for it."""
    import shutil

    adapter_dir, _, _ = trained
    return Path(shutil.copytree(adapter_dir, Path(env["OUTPUT_DIR"]) / SPEAKER))


def test_export_routes_make_and_download_each_export(client, env, tmp_path, trained, llamacpp_gemma):
    """POST ?wait=true makes the export in a job's child process and answers with it, GET downloads it
    as a zip; 404 before either exists."""
    install_adapter(env, trained)
    assert client.get(f"/speakers/{SPEAKER}/exports/merged").status_code == 404
    assert client.post("/speakers/Nobody/exports/merged").json() == {
        "detail": "no adapter for speaker 'Nobody'; train one with POST /train"}
    assert client.post(f"/speakers/{SPEAKER}/exports/onnx").status_code == 422
    assert client.post(f"/speakers/{SPEAKER}/exports/merged?wait=true&dtype=int3").status_code == 422
    assert client.post(f"/speakers/{SPEAKER}/exports/merged?wiat=true").status_code == 422  # a typo is refused

    r = client.post(f"/speakers/{SPEAKER}/exports/merged?wait=true")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["kind"] == "merged" and body["url"] == f"/speakers/{SPEAKER}/exports/merged"
    assert "model.safetensors" in body["files"]
    r = client.get(body["url"])
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    (tmp_path / "m.zip").write_bytes(r.content)
    with zipfile.ZipFile(tmp_path / "m.zip") as zf:
        assert set(body["files"]) == set(zf.namelist())
        assert zf.testzip() is None
        assert json.loads(zf.read(model_export.INFO_FILE))["seconds"] == body["seconds"]

    # the tiny base is a local folder: a gguf export of it has no base GGUF to include, but works
    r = client.post(f"/speakers/{SPEAKER}/exports/gguf?wait=true")
    assert r.status_code == 200, r.text
    assert set(r.json()["files"]) == {model_export.ADAPTER_GGUF, model_export.MODELFILE, model_export.INFO_FILE}
    gemma = model_export.modelfile("b.gguf", "a.gguf", SPEAKER, "{{ bos_token }}<start_of_turn>user ...")
    assert 'PARAMETER stop "<end_of_turn>"' in gemma and "<start_of_turn>model\n" in gemma


def test_an_export_is_a_job_with_progress_events_and_a_result(client, env, trained, llamacpp_gemma):
    """Without `wait` the export answers 202 with its job at once; the job reports each stage as progress,
    ends with the export's files in its result, is listed by kind, and cannot be resumed; deleting the
    speaker deletes their exports unless the adapter is kept."""
    from conftest import finished, wait_for_job

    install_adapter(env, trained)
    r = client.post(f"/speakers/{SPEAKER}/exports/merged")
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == job["url"] == f"/jobs/{job['job_id']}"
    assert (job["kind"], job["speaker"], job["config"]) == ("export_merged", SPEAKER, {"export": "merged", "dtype": "float32"})
    done = wait_for_job(client, job["job_id"], finished)
    assert done["status"] == "succeeded", done
    exports_dir = Path(env["EXPORTS_DIR"]) / SPEAKER / "merged"
    assert done["result"]["url"] == f"/speakers/{SPEAKER}/exports/merged"
    assert done["result"]["files"] == {p.name: p.stat().st_size for p in exports_dir.iterdir()}
    events = client.get(f"{job['url']}/events?stream=false").json()["data"]
    stages = [e["data"]["stage"] for e in events if e["type"] == "progress"]
    assert stages == list(model_export.MERGE_STAGES)
    statuses = [e["data"]["status"] for e in events if e["type"] == "status"]
    assert statuses == ["queued", "running", "succeeded"]

    assert [j["job_id"] for j in client.get("/jobs?kind=export_merged").json()["data"]] == [job["job_id"]]
    assert client.get("/jobs?kind=train").json()["count"] == 0
    r = client.post(f"{job['url']}/resume")
    assert r.status_code == 409 and "POST /speakers/Олена/exports/merged again" in r.json()["detail"]

    r = client.delete(f"/speakers/{SPEAKER}?keep_adapter=true")  # the job's log goes; the adapter and exports stay
    assert r.status_code == 200 and not any("exports" in p for p in r.json()["deleted"]), r.text
    assert exports_dir.is_dir()
    deleted = client.delete(f"/speakers/{SPEAKER}").json()["deleted"]
    assert str(Path(env["EXPORTS_DIR"]) / SPEAKER) in deleted and not exports_dir.parent.exists()
    assert client.get(f"/speakers/{SPEAKER}/exports/merged").status_code == 404


def test_a_running_export_is_cancelled_and_the_previous_export_stays(client, env, trained, llamacpp_gemma):
    """An export job cancelled while it runs (here: its files written, waiting to swap them in) ends
    cancelled at once, its half-made folder is removed and the previous export is still served; while
    it runs, training or deleting the speaker is a 409 that names it."""
    from conftest import finished, wait_for_job

    install_adapter(env, trained)
    before = client.post(f"/speakers/{SPEAKER}/exports/gguf?wait=true").json()
    final = Path(env["EXPORTS_DIR"]) / SPEAKER / "gguf"
    with model_export._swap_lock(final):  # the export below does all its work, then waits here
        job = client.post(f"/speakers/{SPEAKER}/exports/gguf").json()
        wait_for_job(client, job["job_id"], lambda j: (j["progress"] or {}).get("stage") == model_export.GGUF_STAGES[-1],
                     what="the export's last stage")
        assert list(final.parent.glob(".tmp-gguf-*")), "the running export has its temporary folder"
        client.post("/upload-text", json={"speaker": SPEAKER, "dialog": [
            {"speaker": "Петро", "content": "Привіт"}, {"speaker": SPEAKER, "content": "ага"}]})
        for r in (client.post("/train", json={"speaker": SPEAKER}), client.delete(f"/speakers/{SPEAKER}")):
            assert r.status_code == 409 and "GGUF export job" in r.json()["detail"] and job["job_id"] in r.json()["detail"], r.text
        assert client.post(f"/jobs/{job['job_id']}/cancel").status_code == 200
        cancelled = wait_for_job(client, job["job_id"], finished, timeout=30)
    assert cancelled["status"] == "cancelled", cancelled
    assert not list(final.parent.glob(".tmp-gguf-*"))
    assert client.get(f"/speakers/{SPEAKER}/exports/gguf").status_code == 200
    assert json.loads((final / model_export.INFO_FILE).read_text(encoding="utf-8"))["seconds"] == before["seconds"]
    assert model_export.info(Path(env["EXPORTS_DIR"]), SPEAKER, "gguf")["created_at"].startswith(before["created_at"][:19])


def test_a_failed_export_job_says_why(client, env, trained, tiny_llama):
    """A GGUF export of a family whose names are not mapped to llama.cpp's fails as a job, with the reason;
    with `wait`, a 500 that says it; nothing is left in the exports folder."""
    from conftest import finished, wait_for_job

    adapter = install_adapter(env, trained)
    info = json.loads((adapter / "training_info.json").read_text(encoding="utf-8"))
    (adapter / "training_info.json").write_text(json.dumps({**info, "base_model": str(tiny_llama)}), encoding="utf-8")
    job = client.post(f"/speakers/{SPEAKER}/exports/gguf").json()
    failed = wait_for_job(client, job["job_id"], finished)
    assert failed["status"] == "failed"
    assert failed["error"].startswith("the gguf export failed: no GGUF adapter export for 'llama' models yet"), failed
    r = client.post(f"/speakers/{SPEAKER}/exports/gguf?wait=true")
    assert r.status_code == 500 and "no GGUF adapter export for 'llama' models yet" in r.json()["detail"]
    assert not list((Path(env["EXPORTS_DIR"]) / SPEAKER).glob("*gguf*"))


def test_half_made_exports_a_killed_server_left_are_removed_at_start(env, trained):
    """An export killed with its server leaves a temporary folder (possibly gigabytes); the next start removes it."""
    from fastapi.testclient import TestClient

    from main import app

    left = Path(env["EXPORTS_DIR"]) / SPEAKER / ".tmp-merged-1a2b3c4d"
    (left / "model.safetensors").parent.mkdir(parents=True)
    (left / "model.safetensors").write_bytes(b"half")
    (Path(env["EXPORTS_DIR"]) / "loose-file").write_text("not a speaker's folder")
    with TestClient(app):
        assert not left.exists() and left.parent.is_dir()


def test_a_download_is_one_whole_export_while_exports_replace_it(tmp_path):
    """Downloads taken while new exports are swapped in, again and again, are each one whole export:
    never a missing file, never files of two exports."""
    import threading

    root, final = tmp_path / "exports", model_export.export_dir(tmp_path / "exports", SPEAKER, "gguf")
    names = [f"part-{i}.bin" for i in range(8)]

    def install(version: int) -> None:  # as export_merged and export_gguf do
        with model_export._lock(final):
            tmp = model_export._new_tmp(final)
            for name in names:
                (tmp / name).write_bytes(f"{version}".encode() * 4096)
            model_export._install(tmp, final, {"version": version, "created_at": "x", "seconds": 0})

    install(0)
    stop, problems = threading.Event(), []

    def keep_exporting() -> None:
        version = 1
        while not stop.is_set():
            install(version)
            version += 1

    exporter = threading.Thread(target=keep_exporting)
    exporter.start()
    try:
        for i in range(150):
            into = tmp_path / f"d{i % 2}.zip"
            try:
                assert model_export.archive(root, SPEAKER, "gguf", into) == into
                with zipfile.ZipFile(into) as zf:
                    version = json.loads(zf.read(model_export.INFO_FILE))["version"]
                    assert sorted(zf.namelist()) == sorted([*names, model_export.INFO_FILE])
                    assert {zf.read(n) for n in names} == {f"{version}".encode() * 4096}
            except (OSError, AssertionError, KeyError) as exc:
                problems.append(repr(exc))
    finally:
        stop.set()
        exporter.join()
    assert not problems, problems[:3]
