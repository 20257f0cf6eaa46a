"""Robustness: malformed text, damaged files, bad headers, errors that keep the connection healthy,
and data that must not outlive a delete or reach the log."""

from __future__ import annotations

from pathlib import Path

import pytest


CUT_EMOJI = rb"x\ud83d"  # the first half of 😀, as JavaScript sends a string cut in the middle of an emoji
SURROGATE_BODIES = [
    ("/upload-text", rb'{"dialog":[{"speaker":"A","content":"' + CUT_EMOJI + rb'"}],"speaker":"A"}',
     ["body", "dialog", 0, "content"]),
    ("/generate", rb'{"speaker":"A","prompt":"' + CUT_EMOJI + rb'"}', ["body", "prompt"]),
    ("/v1/chat/completions", rb'{"model":"A","messages":[{"role":"user","content":"' + CUT_EMOJI + rb'"}]}',
     ["body", "messages", 0, "content"]),
    ("/train", rb'{"speaker":"A\ud83d"}', ["body", "speaker"]),
]


@pytest.mark.parametrize("path,body,loc", SURROGATE_BODIES, ids=[p for p, _, _ in SURROGATE_BODIES])
def test_a_lone_surrogate_is_a_422_naming_its_field_and_stores_nothing(client, env, path, body, loc):
    r = client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json() == {"detail": [{
        "type": "string_unicode", "loc": loc,
        "msg": "contains an invalid character: an unpaired UTF-16 surrogate (U+D83D at index 1), such as half "
               "of an emoji cut in two; send whole characters",
    }]}
    assert list(Path(env["DATA_DIR"]).glob("*messages*")) == []
    assert client.get("/jobs").json()["count"] == 0
