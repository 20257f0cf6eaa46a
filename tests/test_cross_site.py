"""Cross-site requests (issue 15, defect 3): a web page the user visits must not change the service's
state. Requests carry exactly the headers Chromium sends; a real server on loopback answers them."""

from __future__ import annotations

import httpx
import pytest

from conftest import LiveServer, server_env

ALLOWED = "http://localhost:3000"
EVIL = "http://evil.example"
CHAT = "".join(f"31/12/23, 21:{i:02d} - {'Ann' if i % 2 else 'Bob'}: message number {i}\n" for i in range(20))
BOUNDARY = "----WebKitFormBoundary7MA4YWxkTrZu0gW"


def form_body(speaker: str) -> bytes:
    """A multipart body as Chromium builds it for <form enctype="multipart/form-data"> with a file input."""
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"speaker\"\r\n\r\n{speaker}\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"chat.txt\"\r\n"
            f"Content-Type: text/plain\r\n\r\n{CHAT}\r\n--{BOUNDARY}--\r\n").encode()


def form_post_headers(origin: str, site: str) -> dict[str, str]:
    """Chromium 12x submitting a form (a navigation) from `origin` to the service."""
    return {
        "Cache-Control": "max-age=0", "Origin": origin, "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        "Upgrade-Insecure-Requests": "1", "Sec-Fetch-Site": site, "Sec-Fetch-Mode": "navigate",
        "Sec-Fetch-User": "?1", "Sec-Fetch-Dest": "document", "Referer": f"{origin}/",
        "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36",
        "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
    }


def fetch_headers(origin: str, site: str, mode: str = "no-cors") -> dict[str, str]:
    """Chromium's fetch(url, {method: "POST", mode}) from a page at `origin` (no body, or text/plain)."""
    return {"Origin": origin, "Sec-Fetch-Site": site, "Sec-Fetch-Mode": mode, "Sec-Fetch-Dest": "empty",
            "Referer": f"{origin}/", "Accept": "*/*", "Content-Type": "text/plain;charset=UTF-8"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_gemma):
    root = tmp_path_factory.mktemp("cross-site")
    live = LiveServer({**server_env(root, tiny_gemma), "ALLOWED_ORIGINS": f"{ALLOWED}/, http://other.example",
                       "ALLOWED_HOSTS": "persona.lan, *.home.example"}, root / "server.log")
    yield live
    live.stop()


def stored(server, speaker: str) -> int:
    r = httpx.get(f"{server.url}/speakers")
    return sum(s["messages"] for s in r.json()["data"] if s["speaker"] == speaker)


def test_a_cross_site_form_post_is_refused_and_stores_nothing(server):
    r = httpx.post(f"{server.url}/upload-file", content=form_body("Ann"), headers=form_post_headers(EVIL, "cross-site"))
    assert r.status_code == 403, r.text
    assert r.json() == {"detail": f"cross-site request refused: Origin '{EVIL}' is not this server's origin; "
                                  "to allow a page there, add its origin to ALLOWED_ORIGINS"}
    assert stored(server, "Ann") == 0


@pytest.mark.parametrize("path", ["/speakers/Ann/evaluate", "/jobs/0123abcd/cancel", "/train", "/upload-text"])
def test_a_cross_site_fetch_post_is_refused(server, path):
    r = httpx.post(server.url + path, content=b'{"speaker": "Ann"}', headers=fetch_headers(EVIL, "cross-site"))
    assert r.status_code == 403, r.text
    assert "ALLOWED_ORIGINS" in r.json()["detail"]


def test_a_foreign_origin_is_refused_without_sec_fetch_site(server):
    """Older browsers send Origin but no Sec-Fetch-* headers; a same-site page (another port) too."""
    headers = {"Origin": EVIL, "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    assert httpx.post(f"{server.url}/upload-file", content=form_body("Ann"), headers=headers).status_code == 403
    same_site = {**fetch_headers("http://127.0.0.1:1", "same-site")}
    assert httpx.delete(f"{server.url}/speakers/Ann", headers=same_site).status_code == 403
    assert httpx.post(f"{server.url}/upload-file", content=form_body("Ann"),
                      headers={**form_post_headers("null", "cross-site")}).status_code == 403  # a sandboxed frame
    assert stored(server, "Ann") == 0


def test_under_v1_the_refusal_is_in_openais_shape(server):
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"{}", headers=fetch_headers(EVIL, "cross-site", "cors"))
    assert r.status_code == 403, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "ALLOWED_ORIGINS" in r.json()["error"]["message"]


def test_same_origin_allowed_origins_and_clients_without_origin_pass(server):
    same_origin = form_post_headers(server.url, "same-origin")
    r = httpx.post(f"{server.url}/upload-file", content=form_body("Ann"), headers=same_origin)
    assert r.status_code == 200, r.text
    added = r.json()["added"]
    assert added > 0 and stored(server, "Ann") == added
    r = httpx.post(f"{server.url}/upload-file", content=form_body("Bob"), headers=form_post_headers(ALLOWED, "cross-site"))
    assert r.status_code == 200, r.text  # listed in ALLOWED_ORIGINS (with a trailing slash there)
    r = httpx.post(f"{server.url}/upload-file", files={"file": ("chat.txt", CHAT.encode())}, data={"speaker": "Bob"})
    assert r.status_code == 200, r.text  # curl, SDKs: no Origin, no Sec-Fetch-Site
    r = httpx.post(f"{server.url}/jobs/0123abcd/cancel", headers={"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate"})
    assert r.status_code == 404, r.text  # typed into the address bar: the user's own request


def test_reading_is_not_refused(server):
    """A GET cannot change anything, and a page cannot read the answer without CORS."""
    r = httpx.get(f"{server.url}/speakers", headers={"Origin": EVIL, "Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 200, r.text


REBIND = "rebind.attacker.example"


def rebound(origin_host: str, port: int, **extra) -> dict[str, str]:
    """What a browser sends from a page on `origin_host` after its name was rebound to 127.0.0.1:
    the page's own name as Host and as Origin."""
    return {"Host": f"{origin_host}:{port}", "Origin": f"http://{origin_host}:{port}", **extra}


def test_dns_rebinding_is_refused_for_writes_and_reads(server):
    """Issue 29, defect 12: the Host a rebound page sends is not one the server answers to."""
    port = server.port
    detail = (f"host '{REBIND}' is not a name this server is reached by: allowed are localhost, 127.0.0.1, [::1], "
              "the address it is bound to and ALLOWED_HOSTS; to serve it under this name, add it to ALLOWED_HOSTS")
    r = httpx.post(f"{server.url}/upload-text", json={"speaker": "Rex", "dialog": [{"speaker": "Rex", "content": "hi"}]},
                   headers=rebound(REBIND, port, **{"Sec-Fetch-Site": "same-origin"}))
    assert (r.status_code, r.json()) == (400, {"detail": detail})
    assert stored(server, "Rex") == 0
    r = httpx.get(f"{server.url}/speakers/Ann/messages", headers=rebound(REBIND, port))
    assert (r.status_code, r.json()) == (400, {"detail": detail})
    r = httpx.get(f"{server.url}/v1/models", headers=rebound(REBIND, port))
    assert (r.status_code, r.json()["error"]["message"]) == (400, detail)
    r = httpx.get(f"{server.url}/health", headers={"Host": "evil.home.example.attacker.example"})
    assert r.status_code == 400, r.text


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST", "127.0.0.1", "[::1]", "persona.lan", "nas.home.example"])
def test_the_names_the_server_is_meant_to_be_reached_by_pass(server, host):
    r = httpx.post(f"{server.url}/upload-text", json={"speaker": "Host", "dialog": [{"speaker": "Host", "content": host}]},
                   headers=rebound(host, server.port))
    assert r.status_code == 200, r.text
    assert httpx.get(f"{server.url}/speakers", headers={"Host": host}).status_code == 200
