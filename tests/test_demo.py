"""The demo page (magnet_jax/demo.py) in a real browser: Debian's chromium driven by Playwright.

The server runs in this process on a free localhost port with a tiny random-weights
checkpoint; the page is driven as a user would (file upload, typing, clicks) and the mask PNG
it offers is compared pixel for pixel with `Predictor.from_checkpoint(...).predict(...)`.
Without /usr/bin/chromium or playwright the browser tests are skipped, unless
MAGNET_JAX_REQUIRE_BROWSER=1 (CI sets it), where they fail.
"""

from __future__ import annotations

import importlib.util
import io
import os
import socket
import threading
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

from magnet_jax import demo
from magnet_jax.assets import SAMPLE_IMAGE
from magnet_jax.checkpoint_io import save_params
from magnet_jax.data import images as image_io
from magnet_jax.models import build_model, random_params
from magnet_jax.models.presets import tiny_model_config
from magnet_jax.predict import Predictor

pytestmark = [pytest.mark.slow,
              # pandas deprecations inside Gradio's queue, not ours
              pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")]

CHROMIUM = "/usr/bin/chromium"
REQUIRE_BROWSER = "MAGNET_JAX_REQUIRE_BROWSER"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Small enough that a test file can exceed it, large enough for sample.jpg.
TEST_LIMITS = demo.Limits(max_image_bytes=demo.MB, max_image_side=4096)
SENTENCE = "the red circle on the left"
RESULT_TIMEOUT_MS = 300_000     # the first request of each batch size compiles the model
PAGE_TIMEOUT_MS = 30_000        # anything else (a loaded CI machine is slow)


def _require_browser():
    missing = []
    if not os.path.exists(CHROMIUM):
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("playwright (pip install -r requirements-test.txt)")
    if missing:
        reason = "the browser test needs " + " and ".join(missing)
        if os.environ.get(REQUIRE_BROWSER) == "1":
            pytest.fail(f"{reason}; {REQUIRE_BROWSER}=1 forbids skipping it")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A params directory of the tiny model at 64 px with random weights.

    Random weights give a nearly constant logit map, so the mask is all or nothing; a fixed
    mask-embedding bias makes it follow the image features instead, so that comparing masks
    pixel by pixel can fail."""
    config = tiny_model_config(64)
    params = random_params(build_model(config), 64, 0)
    bias = 10 * np.random.default_rng(3).standard_normal(64).astype(np.float32)
    params["predictor"]["mask_embed"]["layers_2"]["bias"] = bias
    return save_params(str(tmp_path_factory.mktemp("demo") / "params"), params, config)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """Predictor.from_checkpoint of the same checkpoint, independent of the server's.

    Its batch-of-2 program compiles in a thread while the server compiles its batch of 1 on
    the first request: each lands in the persistent compilation cache before the other side
    needs it, so the two programs compile once each, on both cores at once."""
    predictor = Predictor.from_checkpoint(checkpoint, max_batch=demo.MAX_SENTENCES)
    pair = threading.Thread(target=predictor.predict,
                            args=(Image.new("RGB", (64, 64)), ["one", "two"]), daemon=True)
    pair.start()
    yield predictor
    pair.join()


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """(demo model, url) of a server running in this process on a free localhost port."""
    _require_browser()
    gradio_dir = tmp_path_factory.mktemp("gradio")
    old = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(gradio_dir)     # uploads and outputs, not /tmp/gradio
    model = demo.load_demo_model(checkpoint, None, tmp_path_factory.mktemp("samples"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app, url = demo.serve(model, "127.0.0.1", port, TEST_LIMITS, block=False, quiet=True)
    yield model, url
    app.close()
    if old is None:
        os.environ.pop("GRADIO_TEMP_DIR", None)
    else:
        os.environ["GRADIO_TEMP_DIR"] = old


@pytest.fixture(scope="module")
def browser_page(server):
    """(page, requested URLs) of one headless chromium tab."""
    from playwright.sync_api import expect, sync_playwright
    expect.set_options(timeout=PAGE_TIMEOUT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.set_default_timeout(PAGE_TIMEOUT_MS)
        requested: list[str] = []
        context.on("request", lambda request: requested.append(request.url))
        yield context.new_page(), requested
        browser.close()


def _open(page, url):
    page.goto(url)
    page.wait_for_selector("#segment")


def _segment(page, image_path: str | None, text: str):
    if image_path is not None:
        page.locator("#image input[type=file]").set_input_files(image_path)
        # Uploaded: the preview shows this file (not the one before it).
        page.wait_for_selector(f'#image img[src$="/{os.path.basename(image_path)}"]')
    page.locator("#sentences textarea").fill(text)
    page.locator("#segment").click()


def _wait_for_results(page, count: int):
    from playwright.sync_api import expect
    expect(page.locator("#overlays img")).to_have_count(count, timeout=RESULT_TIMEOUT_MS)
    expect(page.locator("#masks a")).to_have_count(count)


def _downloaded_masks(page) -> list[np.ndarray]:
    """The mask PNGs the page links to, as bool arrays (255 = inside)."""
    masks = []
    for link in page.locator("#masks a").all():
        response = page.request.get(link.get_attribute("href"))
        assert response.ok, response.status
        masks.append(np.asarray(Image.open(io.BytesIO(response.body()))) == 255)
    return masks


def _assert_only_local(requested: list[str]):
    outside = [u for u in requested if urlsplit(u).scheme not in ("data", "blob")
               and urlsplit(u).hostname not in ("127.0.0.1", "localhost")]
    assert requested and not outside, f"the page fetched from outside: {outside}"


def test_a_missing_checkpoint_is_one_line_and_exit_2_before_serving(tmp_path, capsys,
                                                                   monkeypatch):
    def serve(*args, **kwargs):
        raise AssertionError("the server was started")

    monkeypatch.setattr(demo, "serve", serve)
    assert demo.main(["--checkpoint", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: checkpoint ") and "does not exist" in err and "\n" not in err


def test_bad_inputs_are_refused_with_their_reason(tmp_path):
    with pytest.raises(demo.InputError, match="type a sentence"):
        demo.parse_sentences(" \n\t\n", TEST_LIMITS)
    with pytest.raises(demo.InputError, match="5 sentences given; at most 4"):
        demo.parse_sentences("a\nb\nc\nd\ne", TEST_LIMITS)
    assert demo.parse_sentences(" the dog \n\n the cat\n", TEST_LIMITS) == ["the dog", "the cat"]
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    with pytest.raises(demo.InputError, match="notes.png is not an image file"):
        demo.read_image(text_file, TEST_LIMITS)
    large = tmp_path / "large.png"
    large.write_bytes(os.urandom(TEST_LIMITS.max_image_bytes + 1))
    with pytest.raises(demo.InputError, match=r"large.png is 1.0 MB; .*at most 1 MB"):
        demo.read_image(large, TEST_LIMITS)
    wide = tmp_path / "wide.png"
    Image.new("RGB", (4097, 2)).save(wide)
    with pytest.raises(demo.InputError, match="4097 × 2 px; .*4096 px per side"):
        demo.read_image(wide, TEST_LIMITS)
    assert demo.read_image(SAMPLE_IMAGE, TEST_LIMITS).size == (320, 240)


def test_uploaded_image_mask_equals_the_predictor(server, browser_page, reference):
    model, url = server
    page, requested = browser_page
    _open(page, url)
    assert "the first request compiles the model" in page.content().lower()
    _segment(page, SAMPLE_IMAGE, SENTENCE)
    _wait_for_results(page, 1)
    expected = reference.predict(image_io.load_image_rgb(SAMPLE_IMAGE), SENTENCE)
    assert 0 < expected.mask.mean() < 1        # neither empty nor everything
    (mask,) = _downloaded_masks(page)
    assert mask.shape == (240, 320)
    np.testing.assert_array_equal(mask, expected.mask)
    summary = page.locator("#summary").inner_text()
    assert SENTENCE in summary and f"{expected.score:.3f}" in summary and " ms" in summary
    _assert_only_local(requested)


def test_bad_input_shows_a_message_and_the_server_keeps_serving(server, browser_page, tmp_path):
    from playwright.sync_api import expect
    model, url = server
    page, requested = browser_page
    _open(page, url)
    message = page.locator("#message")
    _segment(page, SAMPLE_IMAGE, "   ")
    expect(message).to_contain_text("type a sentence")
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    _segment(page, str(text_file), SENTENCE)
    expect(message).to_contain_text("notes.png is not an image file")
    wide = tmp_path / "wide.png"
    Image.new("RGB", (4097, 2)).save(wide)
    _segment(page, str(wide), SENTENCE)
    expect(message).to_contain_text("4097 × 2 px; images are limited to at most 1 MB and "
                                    "4096 px per side")
    # Over the byte limit, Gradio refuses the upload itself and says so, with the limit.
    large = tmp_path / "large.png"
    large.write_bytes(os.urandom(TEST_LIMITS.max_image_bytes + 1))
    page.locator("#image input[type=file]").set_input_files(str(large))
    expect(page.get_by_text("large.png").first).to_contain_text("1.0 Mb")
    _segment(page, SAMPLE_IMAGE, SENTENCE)
    _wait_for_results(page, 1)
    expect(message).to_have_text("")
    _assert_only_local(requested)


def test_two_sentences_side_by_side(server, browser_page, reference):
    from playwright.sync_api import expect
    model, url = server
    page, requested = browser_page
    _open(page, url)
    sample = model.samples[0]                      # a synthetic scene with its own sentence
    page.locator("#samples tbody tr").first.click()
    textbox = page.locator("#sentences textarea")
    expect(textbox).to_have_value(sample.sentence)
    sentences = [sample.sentence, "the large blue square"]
    page.wait_for_selector("#image img")
    textbox.fill("\n".join(sentences))
    page.locator("#segment").click()
    _wait_for_results(page, 2)
    captions = page.locator("#overlays .caption-label").all_inner_texts()
    assert len(captions) == 2
    for caption, sentence in zip(captions, sentences):
        assert caption.startswith(f"{sentence} · score ") and caption.endswith(" ms")
    expected = reference.predict(image_io.load_image_rgb(sample.image), sentences)
    for mask, prediction in zip(_downloaded_masks(page), expected):
        np.testing.assert_array_equal(mask, prediction.mask)
    _assert_only_local(requested)
