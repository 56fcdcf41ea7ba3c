"""Who may drive the server: the Host and Origin rules, content types and CORS, over real HTTP on a
loopback port (the Guard in front of the real app and the shipped default model)."""

from __future__ import annotations

import base64
import json

import pytest
from test_server import QUICK, Running, settings

from diffuse.server.origin import OriginRules, normalize_origin, split_host

LISTED = "http://localhost:3000"
EVIL = "https://evil.example"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = Running(
        settings(tmp_path_factory.mktemp("origin"), cors_allow_origins=(LISTED,), allow_hosts=("diffuse.lan",))
    )
    yield running
    running.stop()


def state(running: Running):
    return running.app.app.state.server


def outputs_of(running: Running) -> list[str]:
    folder = state(running).settings.outputs
    return sorted(path.name for path in folder.iterdir()) if folder.is_dir() else []


def own(running: Running) -> str:
    return running.base  # http://127.0.0.1:PORT, the origin the server's own page has


def test_cross_origin_posts_are_refused_and_nothing_runs(server):
    before, files = state(server).queue.submitted, outputs_of(server)
    prompt = json.dumps({**QUICK, "seed": 5}).encode()
    attempts = [  # what a foreign page can send without a preflight, and JSON for good measure
        ("text/plain;charset=UTF-8", prompt, {"Origin": EVIL}),
        ("application/x-www-form-urlencoded", b"prompt=x&steps=2", {"Origin": EVIL}),
        ("multipart/form-data; boundary=x", b"--x\r\n\r\n--x--\r\n", {"Origin": EVIL}),
        ("application/json", prompt, {"Origin": EVIL}),
        ("application/json", prompt, {"Origin": "null"}),
        ("application/json", prompt, {"Origin": own(server).replace("127.0.0.1", "localhost")}),  # another origin
        ("application/json", prompt, {"Sec-Fetch-Site": "cross-site"}),  # no Origin, but the browser says
        ("text/plain", prompt, {}),  # no Origin: refused for its type
        ("application/x-www-form-urlencoded", b"sd_model_checkpoint=second", {}),
    ]
    for path in ("/sdapi/v1/txt2img", "/diffuse/v1/jobs", "/sdapi/v1/interrupt", "/sdapi/v1/options"):
        for content_type, body, headers in attempts:
            status, answer, _ = server.call("POST", path, raw=body, headers={"Content-Type": content_type, **headers})
            assert status in (403, 415), (path, content_type, headers, status)
            assert status == (403 if headers else 415)
            flag = "--cors-allow-origins" if status == 403 else "Content-Type: application/json"
            assert flag in answer["detail"] and "\n" not in answer["detail"]
    assert state(server).queue.submitted == before and outputs_of(server) == files


def test_cross_origin_reads_are_refused_too(server):
    for path in ("/sdapi/v1/progress", "/diffuse/v1/gallery", "/outputs/00000-1.png", "/sdapi/v1/options", "/"):
        for origin in (EVIL, "null", "http://127.0.0.1:1"):
            status, _, headers = server.call("GET", path, headers={"Origin": origin})
            assert status == 403 and "access-control-allow-origin" not in {k.lower() for k in headers}, path


def test_a_foreign_host_is_refused(server):
    port = server.base.rsplit(":", 1)[1]
    for host in (
        f"evil.example:{port}",
        "evil.example",
        f"127.0.0.2:{port}",
        f"localhost.evil.example:{port}",
        "[::1",
        "a b",
        f"127.0.0.1:{port}:1",
    ):
        status, body, _ = server.call("GET", "/sdapi/v1/options", headers={"Host": host})
        assert status == 403, host
        if ":" in host and "[" not in host:
            assert "--allow-host" in body["detail"]
    for host in (
        f"localhost:{port}",
        "LOCALHOST",
        f"127.0.0.1:{port}",
        "127.0.0.1",
        f"[::1]:{port}",
        "diffuse.lan",
        f"diffuse.lan:{port}",
    ):
        assert server.call("GET", "/sdapi/v1/options", headers={"Host": host})[0] == 200, host


def test_the_servers_own_page_works(server):
    port = server.base.rsplit(":", 1)[1]
    status, body, headers = server.call(
        "POST",
        "/sdapi/v1/txt2img",
        {**QUICK, "steps": 2, "seed": 3},
        headers={"Origin": own(server), "Sec-Fetch-Site": "same-origin"},
    )
    assert status == 200 and len(body["images"]) == 1
    assert "access-control-allow-origin" not in {k.lower() for k in headers}  # same origin: no CORS needed
    # Reached as localhost, the page's origin is http://localhost:PORT.
    same = {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"}
    assert server.call("GET", "/sdapi/v1/progress", headers=same)[0] == 200
    # Clients that post /interrupt with no body and no type (A1111's do) still may.
    assert server.call("POST", "/sdapi/v1/interrupt", raw=b"", headers={"Content-Type": ""})[0] == 200


def test_a_listed_origin_gets_cors_answers(server):
    headers = {"Origin": LISTED, "Sec-Fetch-Site": "cross-site"}
    status, body, answer = server.call("POST", "/sdapi/v1/txt2img", {**QUICK, "steps": 2, "seed": 4}, headers=headers)
    assert status == 200 and len(body["images"]) == 1
    assert answer["access-control-allow-origin"] == LISTED and "Origin" in answer["vary"]
    assert answer["access-control-allow-credentials"] == "true"
    preflight = {
        "Origin": LISTED,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    status, body, answer = server.call("OPTIONS", "/sdapi/v1/txt2img", headers=preflight)
    assert status == 204 and answer["access-control-allow-origin"] == LISTED
    assert "POST" in answer["access-control-allow-methods"]
    assert "content-type" in answer["access-control-allow-headers"].lower()
    status, _, answer = server.call("OPTIONS", "/sdapi/v1/txt2img", headers={**preflight, "Origin": EVIL})
    assert status == 403 and "access-control-allow-origin" not in {k.lower() for k in answer}
    # A listed origin still sends JSON: its form posts are refused like anyone's.
    status, _, _ = server.call(
        "POST",
        "/sdapi/v1/txt2img",
        raw=b"prompt=x",
        headers={"Origin": LISTED, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 415


def test_credentials_and_the_origin_rules_together(tmp_path):
    running = Running(settings(tmp_path, credentials=("ann", "secret"), cors_allow_origins=(LISTED,)))
    right = {"Authorization": "Basic " + base64.b64encode(b"ann:secret").decode()}
    try:
        # Right credentials do not make a foreign page or a foreign Host welcome.
        assert running.call("POST", "/sdapi/v1/txt2img", QUICK, headers={**right, "Origin": EVIL})[0] == 403
        assert running.call("GET", "/sdapi/v1/options", headers={**right, "Host": "evil.example"})[0] == 403
        assert (
            running.call("POST", "/sdapi/v1/interrupt", raw=b"x", headers={**right, "Content-Type": "text/plain"})[0]
            == 415
        )
        # A listed origin's preflight carries no credentials and is answered; its request needs them.
        preflight = {"Origin": LISTED, "Access-Control-Request-Method": "POST"}
        assert running.call("OPTIONS", "/sdapi/v1/interrupt", headers=preflight)[0] == 204
        status, _, answer = running.call("POST", "/sdapi/v1/interrupt", {}, headers={"Origin": LISTED})
        assert status == 401 and answer["access-control-allow-origin"] == LISTED  # the page can read why
        assert running.call("POST", "/sdapi/v1/interrupt", {}, headers={**right, "Origin": LISTED})[0] == 200
        assert running.call("GET", "/sdapi/v1/options", headers={**right, "Origin": running.base})[0] == 200
    finally:
        running.stop()


def test_every_address_answers_any_host_but_keeps_the_origin_rules():
    rules = OriginRules.create("0.0.0.0")
    assert rules.host_allowed("whatever.example:7860") and rules.host_allowed("192.168.1.5")
    assert rules.origin_kind("http://192.168.1.5:7860", "http", "192.168.1.5:7860") == "own"
    assert rules.origin_kind(EVIL, "http", "192.168.1.5:7860") == "foreign"
    bound = OriginRules.create("192.168.1.5", ["pc.lan, other.lan"], [LISTED + "/"])
    assert bound.host_allowed("192.168.1.5:7860") and bound.host_allowed("other.lan") and bound.host_allowed("[::1]")
    assert not bound.host_allowed("192.168.1.6:7860")
    assert bound.origin_kind("http://LOCALHOST:3000", "http", "pc.lan") == "listed"
    assert bound.origin_kind("https://pc.lan:443", "https", "pc.lan") == "own"
    assert bound.origin_kind("http://pc.lan:80", "http", "pc.lan:80") == "own"
    assert bound.origin_kind(None, "http", "pc.lan") == "none"


@pytest.mark.parametrize(
    "hosts, origins, message",
    [
        (["*"], [], "--allow-host"),
        (["pc.lan:7860"], [], "--allow-host"),
        (["a b"], [], "--allow-host"),
        ([], ["*"], "--cors-allow-origins"),
        ([], ["null"], "--cors-allow-origins"),
        ([], ["http://x.example/path"], "--cors-allow-origins"),
        ([], ["ftp://x.example"], "--cors-allow-origins"),
    ],
)
def test_bad_flag_values_are_refused(hosts, origins, message):
    with pytest.raises(ValueError, match=message):
        OriginRules.create("127.0.0.1", hosts, origins)


def test_host_and_origin_spellings():
    assert split_host("[::1]:7860") == ("::1", 7860) and split_host("LocalHost") == ("localhost", None)
    assert split_host("::1") is None and split_host("x:99999") is None and split_host("x:") is None
    assert normalize_origin("HTTP://Example.COM:80") == "http://example.com"
    assert normalize_origin("https://[::1]:8443") == "https://[::1]:8443"
    assert normalize_origin("null") is None and normalize_origin("http://u:p@x.example") is None


def test_cli_refuses_bad_flags_before_loading(capsys, monkeypatch):
    from diffuse.cli import main

    monkeypatch.delenv("DIFFUSE_API_AUTH", raising=False)
    assert main(["serve", "--cors-allow-origins", "*"]) == 2
    assert "--cors-allow-origins" in capsys.readouterr().err
    assert main(["serve", "--allow-host", "x.lan:80"]) == 2
    assert "--allow-host" in capsys.readouterr().err
    assert main(["serve", "--request-memory", "16"]) == 2
    assert "--request-memory (16 MB) must hold at least one whole body (32 MB)" in capsys.readouterr().err
