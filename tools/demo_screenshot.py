"""Screenshot of the demo page (docs/demo.png): a sample with several sentences side by side.

    python tools/demo_screenshot.py --checkpoint workdir/synthetic [--out docs/demo.png] \
        [--sample 0] [--sentence "the orange star" --sentence ...]

Starts `magnet_jax.demo` on a free localhost port, opens it in headless chromium
(/usr/bin/chromium, driven by Playwright), picks the sample, runs the sentences as one batch
and saves a full-page screenshot. The default sentences name three objects of the default
sample (the synthetic val scene #0: the sample's own sentence, then two other objects).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DEFAULT_OTHER_SENTENCES = ("the large green star", "the red circle")
RESULT_TIMEOUT_MS = 300_000     # the first request compiles the model


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="any checkpoint magnet_jax.demo reads")
    p.add_argument("--step", help="training workdirs: latest (default), best or a step number")
    p.add_argument("--out", default="docs/demo.png",
                   help="the PNG to write (default docs/demo.png)")
    p.add_argument("--sample", type=int, default=0, help="row of the page's samples (default 0)")
    p.add_argument("--sentence", action="append",
                   help="a sentence to compare (repeat, up to 4; default: the sample's own and "
                        f"{' / '.join(DEFAULT_OTHER_SENTENCES)})")
    p.add_argument("--width", type=int, default=1280, help="browser width in px (default 1280)")
    args = p.parse_args(argv)
    if not os.path.exists(CHROMIUM):
        p.error(f"{CHROMIUM} is missing (apt-get install chromium)")

    from playwright.sync_api import expect, sync_playwright

    from magnet_jax import demo
    work = tempfile.TemporaryDirectory(prefix="magnet_jax_screenshot_")
    os.environ["GRADIO_TEMP_DIR"] = str(Path(work.name) / "gradio")
    try:
        model = demo.load_demo_model(args.checkpoint, args.step, Path(work.name))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not 0 <= args.sample < len(model.samples):
        p.error(f"--sample must be in 0..{len(model.samples) - 1}")
    sample = model.samples[args.sample]
    sentences = args.sentence or [sample.sentence, *DEFAULT_OTHER_SENTENCES]
    app, url = demo.serve(model, "127.0.0.1", _free_port(), block=False, quiet=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                 args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": args.width, "height": 900})
            page.goto(url)
            page.locator("#samples tbody tr").nth(args.sample).click()
            page.wait_for_selector("#image img")
            page.locator("#sentences textarea").fill("\n".join(sentences))
            page.locator("#segment").click()
            expect(page.locator("#overlays img")).to_have_count(len(sentences),
                                                                timeout=RESULT_TIMEOUT_MS)
            # Once more: the first request compiled the model, the page now shows the latency of
            # a compiled one.
            page.locator("#segment").click()
            expect(page.locator("#summary")).not_to_contain_text("compiled",
                                                                 timeout=RESULT_TIMEOUT_MS)
            expect(page.locator("#overlays img")).to_have_count(len(sentences))
            page.wait_for_load_state("networkidle")
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        app.close()
    print(f"{args.out}: {sample.label}; sentences: {' | '.join(sentences)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
