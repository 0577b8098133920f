"""The gateway's web page in a real headless Chromium (Debian's, driven by Playwright): a
photo uploaded and asked about, the answer streaming in with its timing line, a follow-up
about the same image, a webcam frame from Chromium's fake camera, and the errors a person
reads when the model server is down."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from edgevlm.samples import sample_image
from edgevlm.serve.tritonserver import free_port

CHROMIUM = os.environ.get("EDGEVLM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
PATIENCE_MS = 120_000  # hangs only: every wait ends when the page shows what it waits for

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is installed by `make setup`")
if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM}: `make setup` installs Debian's chromium where apt-get "
                "runs as root; elsewhere set EDGEVLM_CHROMIUM", allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    context.grant_permissions(["camera"])
    page = context.new_page()
    yield page
    context.close()


@pytest.fixture(scope="module")
def web(server, start_gateway):
    return start_gateway(server.grpc_url)


def _ask(page, question: str) -> str:
    """Ask and wait until the answer has ended (the Ask button comes back). The page's CSP
    forbids eval, so the waits are on selectors and the counts on data attributes."""
    page.fill("#question", question)
    page.click("#send")  # disables the button before its first await
    page.wait_for_selector("#send:not([disabled])", timeout=PATIENCE_MS)
    assert page.is_hidden("#error"), page.text_content("#error")
    return page.locator("#conversation li.assistant").last.text_content()


def _deltas(page) -> int:
    return int(page.get_attribute("#conversation", "data-deltas"))


def test_a_photo_is_asked_about_and_the_answer_streams_with_its_timing(page, web, client, tmp_path):
    photo = tmp_path / "chelsea.png"
    photo.write_bytes(sample_image("chelsea"))
    page.goto(web + "/")
    page.wait_for_selector("#health.up", timeout=PATIENCE_MS)
    page.set_input_files("#image-file", str(photo))
    page.wait_for_selector("#preview:not([hidden])")
    answer = _ask(page, "What is in the image?")
    # the same answer as the gRPC client gets, arrived in several pieces
    assert answer == client.generate("What is in the image?", image=sample_image("chelsea"), max_tokens=128).text
    assert _deltas(page) > 1
    timing = page.text_content("#timing")
    # earlier tests sent this photo: the server may have its embeddings cached
    assert ("image encode" in timing or "image cached" in timing) and "first text" in timing \
        and "tok/s" in timing, timing
    # a follow-up about the same image: the page sends the first turn as history
    follow = _ask(page, "And what colour is it?")
    history = [("What is in the image?", answer)]
    assert follow == client.generate("And what colour is it?", image=sample_image("chelsea"), history=history,
                                     max_tokens=128).text
    assert page.locator("#conversation li").count() == 4
    if os.environ.get("EDGEVLM_SCREENSHOT"):  # docs/web.png: `EDGEVLM_SCREENSHOT=docs/web.png pytest ...`
        page.screenshot(path=os.environ["EDGEVLM_SCREENSHOT"])


def test_a_webcam_frame_from_the_fake_camera_is_asked_about(page, web):
    page.goto(web + "/")
    page.click("#camera-start")
    page.wait_for_selector("#camera[data-ready]", timeout=PATIENCE_MS)
    page.click("#camera-take")
    page.wait_for_selector("#preview:not([hidden])")
    assert page.get_attribute("#preview", "src").startswith("data:image/jpeg;base64,")
    assert _ask(page, "What do you see?")
    assert "image encode" in page.text_content("#timing")


def test_a_dead_model_server_is_explained_not_a_blank_page(page, start_gateway):
    dead = start_gateway(f"127.0.0.1:{free_port()}")  # nothing listens there
    page.goto(dead + "/")
    page.wait_for_selector("#health.down", timeout=PATIENCE_MS)
    page.fill("#question", "Anyone there?")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])", timeout=PATIENCE_MS)
    assert "model server is not reachable" in page.text_content("#error")
    assert page.locator("#conversation li").count() == 0  # the unanswered question is taken back


def test_refusals_are_said_in_words(page, server, start_gateway, tmp_path):
    """An image over the gateway's limit and a prompt over the context: the reason, not a blank."""
    small = start_gateway(server.grpc_url, "--max-image-mb", "0.01")
    photo = tmp_path / "astronaut.png"
    photo.write_bytes(sample_image("astronaut"))
    page.goto(small + "/")
    page.set_input_files("#image-file", str(photo))
    page.wait_for_selector("#preview:not([hidden])")
    page.fill("#question", "What is in the image?")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])", timeout=PATIENCE_MS)
    assert "too large" in page.text_content("#error")
    page.click("#image-clear")
    page.fill("#question", "word " * 2000)
    page.click("#send")
    page.wait_for_selector("#send:not([disabled])", timeout=PATIENCE_MS)
    assert "the context holds" in page.text_content("#error")


def test_a_clip_goes_as_a_video_url_and_its_frames_are_read(page, web, tmp_path):
    """A short clip picked as the file: shown as a clip, sent as OpenAI's video_url part; the
    MobileVLM behind this gateway reads its frames as pictures, and the timing line says so."""
    from test_llava_video import write_clip
    clip = tmp_path / "door.mp4"
    clip.write_bytes(write_clip(("chelsea", "coffee")))  # 6 frames
    page.goto(web + "/")
    page.set_input_files("#image-file", str(clip))
    page.wait_for_selector("#clip:not([hidden])")
    assert page.locator("#preview").is_hidden()
    assert _ask(page, "Did the door open?")
    assert "6 frames, decoded in" in page.text_content("#timing")


def test_the_page_loads_only_its_own_files(web):
    import urllib.request
    with urllib.request.urlopen(web + "/") as r:
        html = r.read().decode()
        csp = r.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "http" not in html.replace("http-equiv", "")
    with urllib.request.urlopen(web + "/static/app.js") as r:
        assert r.headers["Content-Type"].startswith("text/javascript")
