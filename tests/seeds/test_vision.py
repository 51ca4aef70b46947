"""Images through a real vision path: the tiny Mixtral 8x22B with a tiny multimodal
projector, served by llama.cpp's own image pipeline (decode, encode, embed)."""

from __future__ import annotations

import base64
import io
import runpy
import threading
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from PIL import Image as PILImage

from servelm.api.services import services
from servelm.billing.money import MICRO
from servelm.catalog.models_file import load_catalog
from tests.conftest import LiveServer, make_settings, provision, seed_models_file, start_server
from tests.support import ggufgen

pytestmark = pytest.mark.slow  # real engine processes or models: seconds each

SLUG = "mixtral-8x22b-instruct"
SNIPPET = Path(__file__).parent / "snippets" / "requests_mixtral_8x22b_image.py"


def png(size: tuple[int, int] = (64, 48)) -> bytes:
    out = io.BytesIO()
    PILImage.new("RGB", size, (30, 120, 200)).save(out, "PNG")
    return out.getvalue()


class Images(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = png()
        self.send_response(200 if self.path == "/image.png" else 404)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return


@pytest.fixture(scope="module")
def image_port() -> Iterator[int]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Images)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def vision(
    models_dir: Path, seed_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("vision")
    mmproj = ggufgen.ensure_mmproj(seed_models[SLUG].parent)
    models_file = seed_models_file(tmp, {SLUG: seed_models[SLUG]}, f'mmproj = "{mmproj}"\n')
    # The operator allow-lists the host name "localhost" (an internal image store);
    # every other private address stays refused.
    settings = make_settings(
        tmp, models_dir, slots=2, models_file=models_file, image_allow_hosts=("localhost:*",)
    )
    srv = start_server(settings, load_catalog(models_dir, models_file))
    yield srv
    srv.stop()


def chat(live: LiveServer, content: object, key: str | None = None) -> httpx.Response:
    return httpx.post(
        f"{live.v1}/{SLUG}",
        json={"messages": [{"role": "user", "content": content}], "max_tokens": 4},
        headers={"x-api-key": key or live.api_key},
        timeout=60,
    )


def image_part(url: str) -> dict[str, object]:
    return {"type": "image_url", "image_url": {"url": url}}


DATA_URI = "data:image/png;base64," + base64.b64encode(png()).decode()


@pytest.mark.parametrize("kind", ["data-uri", "allow-listed-url"])
def test_the_seed_python_example_works_against_a_vision_model(
    vision: LiveServer,
    image_port: int,
    kind: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key = provision(vision.db, f"seer-{kind}", 1)
    image = DATA_URI if kind == "data-uri" else f"http://localhost:{image_port}/image.png"
    source = (
        SNIPPET.read_text()
        .replace("https://api.segmind.com", vision.base_url)
        .replace("YOUR_API_KEY", key)
        .replace("https://example.com/image.jpg", image)
    )
    script = tmp_path / "snippet.py"
    script.write_text(source)
    response = runpy.run_path(str(script))["response"]
    assert "chat.completion" in capsys.readouterr().out
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == SLUG and body["usage"]["completion_tokens"] >= 1


def test_image_tokens_are_prompt_tokens_and_are_paid_for(vision: LiveServer) -> None:
    key = provision(vision.db, "image-payer", 1)
    spec = services(vision.app).catalog.resolve(SLUG)
    text_only = chat(vision, [{"type": "text", "text": "What is this?"}], key)
    with_image = chat(
        vision, [{"type": "text", "text": "What is this?"}, image_part(DATA_URI)], key
    )
    assert text_only.status_code == with_image.status_code == 200, with_image.text
    t, i = text_only.json()["usage"], with_image.json()["usage"]
    assert i["prompt_tokens"] == t["prompt_tokens"] + ggufgen.MMPROJ_IMAGE_TOKENS
    cost = Decimal(with_image.headers["x-cost"])
    assert cost * MICRO == spec.cost_micro(i["prompt_tokens"], i["completion_tokens"])
    assert (
        Decimal(with_image.headers["x-remaining-credits"])
        == Decimal(text_only.headers["x-remaining-credits"]) - cost
    )


def test_two_images_cost_two_images(vision: LiveServer) -> None:
    one = chat(vision, [{"type": "text", "text": "x"}, image_part(DATA_URI)])
    two = chat(vision, [{"type": "text", "text": "x"}, image_part(DATA_URI), image_part(DATA_URI)])
    extra = two.json()["usage"]["prompt_tokens"] - one.json()["usage"]["prompt_tokens"]
    assert extra == ggufgen.MMPROJ_IMAGE_TOKENS


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://127.0.0.1:{port}/image.png", "loopback"),
        ("http://10.0.0.1/image.png", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[::1]:{port}/image.png", "loopback"),
        ("file:///etc/passwd", "not 'file'"),
        ("http://localhost:{port}/missing.png", "HTTP 404"),
        ("data:image/png;base64,AAAA", "not an image"),
    ],
)
def test_refused_images_are_400_in_both_dialects(
    vision: LiveServer, image_port: int, url: str, words: str
) -> None:
    content = [{"type": "text", "text": "hi"}, image_part(url.format(port=image_port))]
    r = chat(vision, content)
    assert r.status_code == 400 and words in r.json()["error"], r.text
    assert r.headers["x-remaining-credits"]  # authenticated, so the balance is told
    r = httpx.post(
        f"{vision.v1}/chat/completions",
        json={"model": SLUG, "messages": [{"role": "user", "content": content}]},
        headers=vision.headers(),
        timeout=60,
    )
    assert r.status_code == 400 and words in r.json()["error"]["message"]


def test_a_text_only_model_refuses_images(seed_live: LiveServer) -> None:
    r = httpx.post(
        f"{seed_live.v1}/llama-v3p1-8b-instruct",
        json={"messages": [{"role": "user", "content": [image_part(DATA_URI)]}]},
        headers=seed_live.headers(),
        timeout=60,
    )
    assert r.status_code == 400
    assert "takes no images" in r.json()["error"]
    assert "no model on this server takes images" in r.json()["error"]
    assert "servelm.toml" not in r.json()["error"] and "mmproj" not in r.json()["error"]


def test_a_text_only_model_names_the_models_that_see_and_tells_the_operator_in_the_log(
    vision: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 29.16: the seed page's image request, sent to a text-only model."""
    body = {"messages": [{"role": "user", "content": [image_part(DATA_URI)]}]}
    with caplog.at_level("WARNING", logger="servelm.chat.serving"):
        r = httpx.post(
            f"{vision.v1}/chat/completions",
            json={"model": "smollm2-135m-instruct", **body},
            headers=vision.headers(),
            timeout=60,
        )
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "messages"
    assert "Model 'smollm2-135m-instruct' takes no images" in err["message"]
    assert f"models on this server that take images: {SLUG}" in err["message"]
    for operator_only in ("mmproj", "servelm.toml", "models file", "vision = true"):
        assert operator_only not in err["message"]
    logged = [rec.getMessage() for rec in caplog.records if "takes none" in rec.getMessage()]
    assert len(logged) == 1 and 'mmproj = "/path/to/mmproj.gguf"' in logged[0]
