"""The HTTP server, started for real on a loopback port and driven over HTTP with the standard
library, on the shipped default model (64x64 images: a few steps take a fraction of a second)."""

from __future__ import annotations

import base64
import http.client
import io
import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
import uvicorn  # noqa: E402

from diffuse.metadata import parse_infotext, read_parameters  # noqa: E402
from diffuse.server.a1111 import Limits  # noqa: E402
from diffuse.server.app import create_app  # noqa: E402
from diffuse.server.serve import check_binding, credentials_from  # noqa: E402
from diffuse.server.state import ServerSettings  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "default"
PROMPT = "a red circle above a blue square"
QUICK = {"prompt": PROMPT, "steps": 4, "cfg_scale": 3, "sampler_name": "Euler a"}


class Running:
    """A server on a free loopback port, in a thread; .call() speaks HTTP to it."""

    def __init__(self, settings: ServerSettings) -> None:
        self.app = create_app(settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"

    def call(
        self,
        method: str,
        path: str,
        body=None,
        *,
        raw: bytes | None = None,
        headers: dict | None = None,
        timeout: float = 120,
    ) -> tuple[int, dict | list | None, dict]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(
            self.base + path, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = response.read()
                status, response_headers = response.status, dict(response.headers)
        except urllib.error.HTTPError as error:
            payload, status, response_headers = error.read(), error.code, dict(error.headers)
        try:
            parsed = json.loads(payload) if payload else None
        except ValueError:
            parsed = {"raw": payload}
        return status, parsed, response_headers

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def settings(tmp_path: Path, **changes) -> ServerSettings:
    values = dict(model=DEFAULT_MODEL, outputs=tmp_path / "outputs", dtype="float32")
    values.update(changes)
    return ServerSettings(**values)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    shutil.copytree(DEFAULT_MODEL, folder / "second")
    (folder / "broken.safetensors").write_bytes(b"not a checkpoint at all")
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, models_dir):
    running = Running(
        settings(
            tmp_path_factory.mktemp("srv"),
            models_dir=models_dir,
            limits=Limits(max_side=256, max_steps=200, max_images=4, max_image_pixels=512 * 512),
            queue_capacity=4,
            max_body_bytes=2_000_000,
        )
    )
    yield running
    running.stop()


def decode_png(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# ---- generation ----------------------------------------------------------------------------------


def test_txt2img_answers_as_a1111_does(server):
    status, body, headers = server.call("POST", "/sdapi/v1/txt2img", {**QUICK, "seed": 7, "an_unknown_key": [1, 2]})
    assert status == 200, body
    assert set(body) == {"images", "parameters", "info"} and len(body["images"]) == 1
    assert headers.get("x-content-type-options") == "nosniff" and "x-process-time" in headers
    image = decode_png(body["images"][0])
    assert image.size == (64, 64)  # the model's own size when none is asked for
    info = json.loads(body["info"])  # a JSON string, as A1111 sends it
    assert info["all_seeds"] == [7] and info["sampler_name"] == "Euler a" and info["steps"] == 4
    parameters = parse_infotext(read_parameters(image))
    assert parameters["Seed"] == "7" and parameters["Steps"] == "4" and parameters["Model"] == "default"
    assert "an_unknown_key" not in body["parameters"] and body["parameters"]["seed"] == 7
    # The same seed draws the same image; a -1 seed is drawn at random and reported.
    again = server.call("POST", "/sdapi/v1/txt2img", {**QUICK, "seed": 7})[1]
    assert again["images"] == body["images"]
    random_seed = json.loads(server.call("POST", "/sdapi/v1/txt2img", {**QUICK, "seed": -1})[1]["info"])["seed"]
    assert 0 <= random_seed < 4294967294


@pytest.mark.parametrize(
    "fields",
    [
        {"sampler_name": "DPM++ 2M Karras"},
        {"sampler_name": "DPM++ 2M", "scheduler": "karras"},
        {"sampler_name": None, "sampler_index": "k_dpmpp_2m", "scheduler": "Karras"},
    ],
)
def test_sampler_names_with_a_schedule(server, fields):
    status, body, _ = server.call("POST", "/sdapi/v1/txt2img", {**QUICK, "seed": 4, **fields})
    assert status == 200, body
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in json.loads(body["info"])["infotexts"][0]


def test_token_merging_as_a1111_asks_for_it(server):
    request = {**QUICK, "seed": 4, "override_settings": {"token_merging_ratio": 0.5}}
    status, body, _ = server.call("POST", "/sdapi/v1/txt2img", request)
    assert status == 200, body
    assert parse_infotext(json.loads(body["info"])["infotexts"][0])["Token merging ratio"] == "0.5"
    plain = server.call("POST", "/sdapi/v1/txt2img", {**QUICK, "seed": 4})[1]
    assert "Token merging" not in json.loads(plain["info"])["infotexts"][0] and plain["images"] != body["images"]


def test_batches_and_iterations_continue_the_seeds(server):
    body = server.call("POST", "/sdapi/v1/txt2img", {**QUICK, "seed": 100, "batch_size": 2, "n_iter": 2})[1]
    info = json.loads(body["info"])
    assert info["all_seeds"] == [100, 101, 102, 103] and len(body["images"]) == 4
    # The second round is the batch that seed 102 makes on its own (same batch size: reduced-precision
    # kernels may differ by batch size, and the PNG records it).
    again = server.call("POST", "/sdapi/v1/txt2img", {**QUICK, "seed": 102, "batch_size": 2})[1]
    assert again["images"] == body["images"][2:]


def test_img2img_and_inpainting_take_data_urls(server):
    start = decode_png(server.call("POST", "/sdapi/v1/txt2img", {**QUICK, "seed": 3})[1]["images"][0])
    status, body, _ = server.call(
        "POST",
        "/sdapi/v1/img2img",
        {**QUICK, "seed": 3, "init_images": [png_data_url(start)], "denoising_strength": 0.5},
    )
    assert status == 200, body
    assert "Denoising strength: 0.5" in read_parameters(decode_png(body["images"][0]))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    status, body, _ = server.call(
        "POST",
        "/sdapi/v1/img2img",
        {
            **QUICK,
            "seed": 3,
            "init_images": [png_data_url(start)],
            "mask": png_data_url(mask),
            "denoising_strength": 1.0,
        },
    )
    assert status == 200, body
    out = decode_png(body["images"][0]).convert("RGB")
    # Outside the mask the original pixels are pasted back.
    assert out.crop((40, 0, 64, 64)).tobytes() == start.convert("RGB").crop((40, 0, 64, 64)).tobytes()
    status, body, _ = server.call("POST", "/sdapi/v1/img2img", QUICK)
    assert status == 422 and "init_images" in body["detail"]


# ---- progress and interrupt ----------------------------------------------------------------------


def test_progress_while_running_then_interrupt(server):
    results = {}
    worker = threading.Thread(
        target=lambda: results.update(
            long=server.call("POST", "/sdapi/v1/txt2img", {**QUICK, "steps": 200, "seed": 11})
        )
    )
    worker.start()
    deadline, seen = time.monotonic() + 60, None
    while time.monotonic() < deadline:
        progress = server.call("GET", "/sdapi/v1/progress")[1]
        if progress["state"]["sampling_step"] >= 2 and progress["current_image"]:
            seen = progress
            break
        time.sleep(0.05)
    assert seen is not None, "no progress reported while a job ran"
    assert 0 < seen["progress"] < 1 and seen["state"]["sampling_steps"] == 200 and seen["state"]["job"] == "txt2img"
    assert decode_png(seen["current_image"]).size == (8, 8)  # the latent preview, no VAE
    status, answer, _ = server.call("POST", "/sdapi/v1/interrupt")
    assert status == 200 and answer["interrupted"] is True
    worker.join(timeout=60)
    status, body, _ = results["long"]
    assert status == 200
    info = json.loads(body["info"])
    assert info["interrupted"] is True and len(body["images"]) == 1  # what it had, decoded
    assert "Steps: 200, Sampler: Euler a, Schedule type: Automatic" in read_parameters(decode_png(body["images"][0]))
    # The next job is not affected, and idle looks idle.
    after = server.call("POST", "/sdapi/v1/txt2img", {**QUICK, "seed": 12})[1]
    assert json.loads(after["info"])["interrupted"] is False
    idle = server.call("GET", "/sdapi/v1/progress")[1]
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    assert server.call("POST", "/sdapi/v1/interrupt")[1]["interrupted"] is False


# ---- models --------------------------------------------------------------------------------------


def test_model_list_and_switching(server):
    models = server.call("GET", "/sdapi/v1/sd-models")[1]
    names = [model["model_name"] for model in models]
    assert names == ["default", "broken", "second"] or names == ["default", "second"]
    assert server.call("GET", "/sdapi/v1/options")[1]["sd_model_checkpoint"].startswith("default [")
    second = next(model for model in models if model["model_name"] == "second")
    status, _, _ = server.call("POST", "/sdapi/v1/options", {"sd_model_checkpoint": second["title"]})
    assert status == 200
    assert server.call("GET", "/sdapi/v1/options")[1]["sd_model_checkpoint"] == second["title"]
    # An unknown name is refused, and a path is not a name: nothing changes.
    for wanted in ("nothing-like-it", str(DEFAULT_MODEL), "../models/default"):
        status, body, _ = server.call("POST", "/sdapi/v1/options", {"sd_model_checkpoint": wanted})
        assert status == 404, body
    assert server.call("GET", "/sdapi/v1/options")[1]["sd_model_checkpoint"] == second["title"]
    # A request can ask for its model, A1111's override_settings way: for that request only,
    # unless it says not to restore.
    body = server.call(
        "POST", "/sdapi/v1/txt2img", {**QUICK, "seed": 1, "override_settings": {"sd_model_checkpoint": "default"}}
    )[1]
    assert "Model: default" in json.loads(body["info"])["infotexts"][0]
    assert server.call("GET", "/sdapi/v1/options")[1]["sd_model_checkpoint"] == second["title"]
    server.call(
        "POST",
        "/sdapi/v1/txt2img",
        {
            **QUICK,
            "override_settings": {"sd_model_checkpoint": "default"},
            "override_settings_restore_afterwards": False,
        },
    )
    assert server.call("GET", "/sdapi/v1/options")[1]["sd_model_checkpoint"].startswith("default [")
    status, body, _ = server.call(
        "POST", "/sdapi/v1/txt2img", {**QUICK, "override_settings": {"sd_model_checkpoint": "x"}}
    )
    assert status == 404 and "no model 'x'" in body["detail"]


def test_a_checkpoint_that_fails_to_load_leaves_the_current_model(server, models_dir):
    broken = [model for model in server.call("GET", "/sdapi/v1/sd-models")[1] if model["model_name"] == "broken"]
    if not broken:
        pytest.skip("the broken file was not listed (its hash could not be taken)")
    before = server.call("GET", "/sdapi/v1/options")[1]["sd_model_checkpoint"]
    status, body, _ = server.call("POST", "/sdapi/v1/options", {"sd_model_checkpoint": "broken"})
    assert 400 <= status < 600 and "broken" in body["detail"]
    assert server.call("GET", "/sdapi/v1/options")[1]["sd_model_checkpoint"] == before
    assert server.call("POST", "/sdapi/v1/txt2img", {**QUICK, "seed": 2})[0] == 200


# ---- limits --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"width": 4096}, "width"),
        ({"height": 12}, "height"),
        ({"steps": 201}, "steps"),
        ({"steps": 0}, "steps"),
        ({"batch_size": 3, "n_iter": 2}, "batch_size"),
        ({"cfg_scale": "high"}, "cfg_scale"),
        ({"seed": 2**40}, "seed"),
        ({"sampler_name": "Nonesuch"}, None),
        ({"enable_hr": True}, "enable_hr"),
        ({"prompt": 5}, "prompt"),
        ({"scheduler": "polyexponential"}, "scheduler"),
        ({"override_settings": {"token_merging_ratio": 0.9}}, "override_settings.token_merging_ratio"),
    ],
)
def test_bad_fields_are_refused_with_422(server, changes, field):
    status, body, _ = server.call("POST", "/sdapi/v1/txt2img", {**QUICK, **changes})
    assert status == 422, body
    if field is not None:
        assert body["field"] == field


def test_bodies_and_images_are_checked_before_decoding(server):
    status, body, _ = server.call("POST", "/sdapi/v1/txt2img", raw=b'{"prompt": "x", "cfg_scale": NaN}')
    assert status == 400 and "NaN" in body["detail"]
    assert server.call("POST", "/sdapi/v1/txt2img", raw=b'{"steps": Infinity}')[0] == 400
    assert server.call("POST", "/sdapi/v1/txt2img", raw=b'{"prompt": ')[0] == 400
    # Too large by its declared length: answered before a byte of it is read.
    connection = http.client.HTTPConnection(server.base.removeprefix("http://"), timeout=10)
    connection.putrequest("POST", "/sdapi/v1/txt2img")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", "2000001")
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and b"2000000 bytes" in response.read()
    connection.close()
    huge = Image.new("RGB", (1024, 1024))  # 1 M pixels, over the 512x512 cap, and a small PNG
    status, body, _ = server.call("POST", "/sdapi/v1/img2img", {**QUICK, "init_images": [png_data_url(huge)]})
    assert status == 422 and "1024x1024" in body["detail"]
    wide = Image.new("RGB", (400, 64))  # within the pixel cap, wider than the 256-pixel side limit
    status, body, _ = server.call("POST", "/sdapi/v1/img2img", {**QUICK, "init_images": [png_data_url(wide)]})
    assert status == 422 and body["field"] == "width" and "400x64" in body["detail"]
    assert (
        server.call(
            "POST",
            "/sdapi/v1/img2img",
            {**QUICK, "init_images": [png_data_url(wide)], "width": 128, "denoising_strength": 0.3},
        )[0]
        == 200
    )
    for bad in ("https://example.com/cat.png", "file:///etc/passwd", "not base64!", base64.b64encode(b"text").decode()):
        status, body, _ = server.call("POST", "/sdapi/v1/img2img", {**QUICK, "init_images": [bad]})
        assert status == 422 and body["field"] == "init_images[0]", bad


def test_png_info_reads_the_parameters(server):
    image = server.call("POST", "/sdapi/v1/txt2img", {**QUICK, "seed": 9})[1]["images"][0]
    body = server.call("POST", "/sdapi/v1/png-info", {"image": "data:image/png;base64," + image})[1]
    assert body["info"].startswith(PROMPT) and body["parameters"]["Seed"] == "9"


def test_the_other_a1111_routes(server):
    samplers = server.call("GET", "/sdapi/v1/samplers")[1]
    assert {"Euler a", "DPM++ 2M"} <= {sampler["name"] for sampler in samplers}
    assert "karras" in {scheduler["name"] for scheduler in server.call("GET", "/sdapi/v1/schedulers")[1]}
    assert server.call("GET", "/sdapi/v1/scripts")[1] == {"txt2img": [], "img2img": []}
    assert server.call("GET", "/sdapi/v1/memory")[1]["ram"]["peak_resident_bytes"] > 0
    assert "/sdapi/v1/txt2img" in server.call("GET", "/openapi.json")[1]["paths"]


# ---- many clients at once ------------------------------------------------------------------------


def test_thirty_concurrent_requests_none_lost_or_mixed_up(server):
    def one(seed: int):
        return seed, server.call(
            "POST", "/sdapi/v1/txt2img", {**QUICK, "steps": 2, "seed": seed, "prompt": f"{PROMPT} {seed}"}
        )

    with ThreadPoolExecutor(max_workers=30) as pool:
        answers = list(pool.map(one, range(1000, 1030)))
    statuses = [status for _, (status, _, _) in answers]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) > 0  # 4 places in the queue behind one running job: not all fit
    for seed, (status, body, headers) in answers:
        if status == 503:
            assert "already waiting" in body["detail"] and headers.get("retry-after")
            continue
        info = json.loads(body["info"])
        assert info["all_seeds"] == [seed] and info["prompt"] == f"{PROMPT} {seed}"
        assert parse_infotext(read_parameters(decode_png(body["images"][0])))["Seed"] == str(seed)


# ---- the page's routes ---------------------------------------------------------------------------


def test_page_jobs_stream_progress_and_save_their_images(server):
    assert server.call("GET", "/")[1] is not None  # HTML (not JSON)
    status, body, _ = server.call("POST", "/diffuse/v1/jobs", {**QUICK, "steps": 6, "seed": 21})
    assert status == 202
    with urllib.request.urlopen(f"{server.base}/diffuse/v1/jobs/{body['id']}/events", timeout=60) as stream:
        text = stream.read().decode()
    events = [block.split("\n", 1) for block in text.strip().split("\n\n")]
    names = [head.removeprefix("event: ") for head, _ in events]
    assert names[-1] == "done" and names.count("progress") >= 2
    done = json.loads(events[-1][1].removeprefix("data: "))
    url = done["images"][0]["url"]
    with urllib.request.urlopen(server.base + url, timeout=10) as response:
        assert response.headers["Content-Type"] == "image/png"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert "Seed: 21" in read_parameters(Image.open(io.BytesIO(response.read())))
    gallery = server.call("GET", "/diffuse/v1/gallery")[1]
    assert gallery[0]["url"] == url


def test_outputs_serve_only_the_folders_own_images(server, tmp_path):
    outputs = server.app.app.state.server.settings.outputs
    secret = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(secret)
    (outputs / "00999-1.png").symlink_to(secret)
    (outputs / "notes.txt").write_text("not an image")
    for path in (
        "/outputs/00999-1.png",
        "/outputs/notes.txt",
        "/outputs/..%2Fsecret.png",
        "/outputs/%2E%2E/secret.png",
        "/outputs/..%2F..%2Fetc%2Fpasswd",
    ):
        assert server.call("GET", path)[0] == 404, path


# ---- safety of the binding -----------------------------------------------------------------------


def test_listening_beyond_loopback_needs_credentials(monkeypatch):
    check_binding("127.0.0.1", None)
    check_binding("::1", None)
    for host in ("0.0.0.0", "192.168.1.5", "example.com"):
        with pytest.raises(ValueError, match="--api-auth"):
            check_binding(host, None)
        check_binding(host, ("user", "pw"))
    assert credentials_from("ann:se:cret") == ("ann", "se:cret")
    monkeypatch.setenv("DIFFUSE_API_AUTH", "bob:pw")
    assert credentials_from(None) == ("bob", "pw") and credentials_from("ann:x") == ("ann", "x")
    with pytest.raises(ValueError, match="USER:PASSWORD"):
        credentials_from("no-colon")


def test_credentials_are_asked_for_on_every_route(tmp_path):
    running = Running(settings(tmp_path, credentials=("ann", "secret")))
    try:
        status, body, headers = running.call("GET", "/sdapi/v1/options")
        assert status == 401 and headers.get("www-authenticate", "").startswith("Basic")
        wrong = {"Authorization": "Basic " + base64.b64encode(b"ann:wrong").decode()}
        assert running.call("GET", "/sdapi/v1/options", headers=wrong)[0] == 401
        assert running.call("GET", "/", headers=wrong)[0] == 401
        right = {"Authorization": "Basic " + base64.b64encode(b"ann:secret").decode()}
        assert running.call("GET", "/sdapi/v1/options", headers=right)[0] == 200
    finally:
        running.stop()


def test_cli_serve_refuses_an_open_binding_without_credentials(capsys, monkeypatch):
    from diffuse.cli import main

    monkeypatch.delenv("DIFFUSE_API_AUTH", raising=False)
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "--api-auth" in capsys.readouterr().err
    assert main(["serve", "--api-auth", "no-colon"]) == 2
    assert "USER:PASSWORD" in capsys.readouterr().err


def test_every_seed_of_a_request_stays_in_a1111s_range(monkeypatch):
    from diffuse import inputs
    from diffuse.server.a1111 import RequestError, read_generation

    body = {"prompt": "x", "batch_size": 2, "n_iter": 2}
    with pytest.raises(RequestError, match=r"seed: seed 4294967293 with 4 images would give the last one seed "):
        read_generation("txt2img", {**body, "seed": inputs.MAX_SEED - 2}, Limits())
    highest = read_generation("txt2img", {**body, "seed": inputs.MAX_SEED - 3}, Limits())
    assert highest.generation.seed == inputs.MAX_SEED - 3
    # A random pick, even the highest, leaves room for all four images.
    monkeypatch.setattr(inputs.random, "randrange", lambda stop: stop - 1)
    assert read_generation("txt2img", {**body, "seed": -1}, Limits()).generation.seed + 3 == inputs.MAX_SEED


def test_no_server_module_imports_one_that_imports_it_back():
    import ast

    folder = Path(__file__).resolve().parent.parent / "diffuse" / "server"
    graph = {}
    for path in folder.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):  # function-level imports count too
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
        graph[path.stem] = {name.split(".")[2] for name in imported if name.startswith("diffuse.server.")}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for name in graph.get(start, ()):
            if name == goal or (name not in seen and reaches(name, goal, seen | {name})):
                return True
        return False

    assert {"app", "state", "page_routes", "a1111_routes"} <= set(graph)
    assert [name for name in graph if reaches(name, name, {name})] == []


def test_an_a1111_body_reads_as_the_public_generation_request():
    from diffuse.request import GenerationRequest
    from diffuse.server.a1111 import read_generation
    from diffuse.speedups import Speedups

    body = {
        **QUICK,
        "negative_prompt": "green",
        "width": 64,
        "height": 48,
        "seed": 3,
        "batch_size": 2,
        "n_iter": 2,
        "scheduler": "karras",
        "eta": 0.3,
        "send_images": False,
        "override_settings": {"CLIP_stop_at_last_layers": 2, "token_merging_ratio": 0.5},
    }
    request = read_generation("txt2img", body, Limits())
    assert request.generation == GenerationRequest(
        prompt=PROMPT,
        negative_prompt="green",
        width=64,
        height=48,
        steps=4,
        guidance_scale=3.0,
        sampler="Euler a",
        schedule_type="Karras",
        seed=3,
        batch_size=2,
        clip_skip=2,
        eta=0.3,
        speedups=Speedups(token_merging=0.5),
    )
    assert (request.kind, request.n_iter, request.send_images, request.model) == ("txt2img", 2, False, None)

    picture = Image.new("RGB", (32, 16), (200, 10, 10))
    mask = Image.new("L", (32, 16), 0)
    inpaint = read_generation(
        "img2img",
        {**QUICK, "init_images": [png_data_url(picture)], "mask": png_data_url(mask), "inpainting_mask_invert": 1},
        Limits(),
    ).generation
    assert inpaint.kind == "inpaint" and inpaint.strength == 0.75 and inpaint.keep_unmasked
    assert inpaint.image.size == (32, 16) and inpaint.mask.mode == "L" and inpaint.mask.getextrema() == (255, 255)
