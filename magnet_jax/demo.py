"""A local demo page: upload or pick an image, type sentences, see each referred mask.

    python -m magnet_jax.demo --checkpoint DIR [--step latest|best|N] [--host 127.0.0.1]
        [--port 7860] [--max-image-mb 10] [--max-image-side 4096]

DIR is any checkpoint `magnet_jax.predict` reads: converted official weights, a training
workdir (e.g. `workdir/synthetic`; its latest checkpoint, or --step) or WORKDIR/params. A
missing or unreadable checkpoint ends with one line `error: ...` and exit status 2 before the
server starts.

The page (Gradio) takes an uploaded image or one of the samples (scenes of the built-in
synthetic data's val and held-out splits, never trained on, each with one of its true
sentences, and the bundled photo) and up to MAX_SENTENCES sentences, one per line. They run
as one batch (`Predictor.predict(image, sentences)`); each result is the mask overlaid on the
image, captioned with its sentence, score, latency and, for a model with a no-target head,
that head's answer, and the binary masks are offered as PNG files (255 inside, 0 outside, at
the image's size). Bad input (no image, a file that is not an image, an image over the size
limits, no sentence) is a message on the page, and the server goes on serving. The model is
compiled lazily: the first request compiles it (once per batch size: 1, 2 and 4 sentences).

Nothing is fetched from the internet: Gradio's analytics and version check are off, the page
uses the system's fonts (no web fonts), and the server listens on --host only (no share link).
"""

from __future__ import annotations

import os

# Read by Gradio at import: no usage reports and no version check leave the machine.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import argparse  # noqa: E402  (after the environment above)
import dataclasses  # noqa: E402
import itertools  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

from magnet_jax.data import images as image_io  # noqa: E402

log = logging.getLogger("magnet_jax.demo")

MB = 2**20
MAX_SENTENCES = 4               # the largest batch bucket is 4: at most three compilations
DEFAULT_MAX_IMAGE_MB = 10.0     # MB of 2**20 bytes, the unit of Gradio's upload limit message
DEFAULT_MAX_IMAGE_SIDE = 4096
SYNTHETIC_SAMPLES = (("val", 0), ("val", 3), ("heldout", 1))   # (split, index), seed of the run
# System font stacks: the default theme's fonts would be downloaded by the browser.
SANS_FONTS = ("system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica Neue", "Arial",
              "sans-serif")
MONO_FONTS = ("ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "Liberation Mono",
              "monospace")


class InputError(ValueError):
    """Input the page refuses, with a one-line message for the user."""


@dataclasses.dataclass(frozen=True)
class Limits:
    max_image_bytes: int = int(DEFAULT_MAX_IMAGE_MB * MB)
    max_image_side: int = DEFAULT_MAX_IMAGE_SIDE
    max_sentences: int = MAX_SENTENCES

    def describe(self) -> str:
        return (f"at most {self.max_image_bytes / MB:g} MB and {self.max_image_side} px per "
                "side")


@dataclasses.dataclass
class Sample:
    image: str          # a file on this machine
    sentence: str
    label: str


@dataclasses.dataclass
class SentenceResult:
    sentence: str
    overlay: Image.Image
    mask: np.ndarray    # (H, W) bool at the image's size
    score: float
    no_target_probability: float | None
    no_target: bool


# --------------------------------------------------------------------------------------------
# Inputs.
# --------------------------------------------------------------------------------------------

def read_image(path: str | os.PathLike, limits: Limits, name: str | None = None) -> Image.Image:
    """The uploaded file as RGB, or InputError naming the file (by `name`, the name the user
    gave it) when it is too large or not an image. Size and dimensions are checked before the
    pixels are decoded."""
    name = name or Path(path).name
    size = os.path.getsize(path)
    if size > limits.max_image_bytes:
        raise InputError(f"{name} is {size / MB:.1f} MB; images are limited to "
                         f"{limits.describe()}")
    try:
        with Image.open(path) as header:     # reads the header only
            width, height = header.size
    except UnidentifiedImageError:
        raise InputError(f"{name} is not an image file (JPEG, PNG, WebP, BMP, GIF or TIFF)") \
            from None
    except Image.DecompressionBombError:
        raise InputError(f"{name} has too many pixels; images are limited to "
                         f"{limits.describe()}") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise InputError(f"cannot read {name}: {str(err).splitlines()[0]}") from None
    if max(width, height) > limits.max_image_side:
        raise InputError(f"{name} is {width} × {height} px; images are limited to "
                         f"{limits.describe()}")
    try:
        return image_io.load_image_rgb(path)
    except (ValueError, OSError) as err:     # truncated or corrupt after a valid header
        raise InputError(str(err).replace(str(path), name)) from None


def parse_sentences(text: str | None, limits: Limits) -> list[str]:
    """One sentence per non-blank line; InputError when there is none or too many."""
    sentences = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not sentences:
        raise InputError("type a sentence that names an object in the image (one per line, "
                         f"up to {limits.max_sentences})")
    if len(sentences) > limits.max_sentences:
        raise InputError(f"{len(sentences)} sentences given; at most {limits.max_sentences} "
                         "are compared at once")
    return sentences


# --------------------------------------------------------------------------------------------
# The model side.
# --------------------------------------------------------------------------------------------

class DemoModel:
    """A Predictor with what the page says about it, and the sample images it offers."""

    def __init__(self, predictor, description: str, samples: list[Sample]):
        self.predictor = predictor
        self.description = description
        self.samples = samples
        self._lock = threading.Lock()     # one batch at a time (the compiled-bucket record)

    def segment(self, image: Image.Image, sentences: list[str]) -> tuple[list[SentenceResult],
                                                                         float, bool]:
        """All sentences on `image` in one batch: results, latency in ms, and whether this
        call compiled the model (a batch size not seen before)."""
        from magnet_jax.predict import bucket_size
        with self._lock:
            bucket = bucket_size(len(sentences), self.predictor.max_batch)
            compiled = bucket not in self.predictor.compiled_batches
            start = time.perf_counter()
            predictions = self.predictor.predict(image, list(sentences))
            latency_ms = (time.perf_counter() - start) * 1e3
        results = [SentenceResult(sentence, image_io.overlay_mask(image, p.mask), p.mask,
                                  p.score, p.no_target_probability, p.no_target)
                   for sentence, p in zip(sentences, predictions)]
        return results, latency_ms, compiled


def synthetic_samples(out_dir: Path, image_size: int, seed: int, style: dict | None = None
                      ) -> list[Sample]:
    """Scenes of the synthetic data's val and held-out splits (deterministic for a seed and the
    run's generator style, a config.data.synthetic section: synthetic.style_kwargs), as the
    JPEG files the training pipeline reads, each with its first true sentence."""
    from magnet_jax.data.synthetic import make_example, style_kwargs
    samples = []
    for split, index in SYNTHETIC_SAMPLES:
        record = make_example(seed, split, index, image_size, **style_kwargs(style or {}))
        path = out_dir / f"synthetic-{split}-{index}.jpg"
        path.write_bytes(record["image_jpeg"])
        sentence = record["sent"][0]
        samples.append(Sample(str(path), sentence, f"synthetic {split} #{index}: {sentence}"))
    return samples


def load_demo_model(checkpoint: str, step: str | None, sample_dir: Path) -> DemoModel:
    """The checkpoint's Predictor on one device (restore's errors propagate) and the samples:
    synthetic scenes drawn with the run's data seed, at the model's input size (or the run's
    synthetic image size when larger), plus the bundled photo; their files go to
    `sample_dir`."""
    import jax

    from magnet_jax import restore, sharding
    from magnet_jax.assets import SAMPLE_IMAGE
    from magnet_jax.predict import DEMO_TEXT, Predictor, text_tokenizer

    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    loaded = restore.load_model(checkpoint, mesh, step=step)
    predictor = Predictor(loaded.config, loaded.params, text_tokenizer(loaded.config),
                          max_batch=MAX_SENTENCES)
    synthetic = ((loaded.run_config or {}).get("data") or {}).get("synthetic") or {}
    size = max(int(synthetic.get("image_size", 0)), predictor.image_size)
    samples = synthetic_samples(sample_dir, size, int(synthetic.get("seed", 0)), synthetic)
    samples.append(Sample(SAMPLE_IMAGE, DEMO_TEXT, f"photo: {DEMO_TEXT}"))
    what = f"{checkpoint}, step {loaded.step}" if loaded.step is not None else checkpoint
    head = (f"; no-target head (threshold {predictor.no_target_threshold:.2f})"
            if predictor.has_no_target_head else "")
    description = (f"{loaded.config.get('name', 'model')} checkpoint: {what} "
                   f"(input {predictor.image_size} × {predictor.image_size}{head})")
    return DemoModel(predictor, description, samples)


# --------------------------------------------------------------------------------------------
# The page.
# --------------------------------------------------------------------------------------------

def caption(result: SentenceResult, latency_ms: float) -> str:
    text = f"{result.sentence} · score {result.score:.3f} · {latency_ms:.0f} ms"
    if result.no_target_probability is not None:
        if result.no_target:
            text += f" · no target (p {result.no_target_probability:.2f})"
        else:
            text += f" · no-target p {result.no_target_probability:.2f}"
    return text


def summary_markdown(results: list[SentenceResult], latency_ms: float, compiled: bool) -> str:
    has_head = results[0].no_target_probability is not None
    rows = ["| # | sentence | score | mask pixels |" + (" no-target p |" if has_head else ""),
            "|---|---|---|---|" + ("---|" if has_head else "")]
    for k, r in enumerate(results, 1):
        sentence = r.sentence.replace("|", "\\|")
        row = f"| {k} | {sentence} | {r.score:.3f} | {int(r.mask.sum())} of {r.mask.size} |"
        if has_head:
            row += f" {r.no_target_probability:.2f}{' (no target)' if r.no_target else ''} |"
        rows.append(row)
    batch = f"{len(results)} sentences in one batch" if len(results) > 1 else "1 sentence"
    note = " (this request compiled the model for that batch size)" if compiled else ""
    return "\n".join(rows) + f"\n\n{batch}: {latency_ms:.0f} ms{note}."


def build_app(model: DemoModel, limits: Limits, work_dir: Path):
    """The Gradio page. Mask PNGs are written under `work_dir`."""
    import gradio as gr

    request_numbers = itertools.count(1)

    def run(image_payload: dict | None, text: str | None):
        """image_payload: the upload as Gradio's raw file data (preprocess=False: the file is
        read here, so a non-image upload gets our message instead of Gradio's decode error)."""
        try:
            if not image_payload or not image_payload.get("path"):
                raise InputError("upload an image or pick a sample first")
            sentences = parse_sentences(text, limits)
            image = read_image(image_payload["path"], limits, image_payload.get("orig_name"))
            results, latency_ms, compiled = model.segment(image, sentences)
        except InputError as err:
            gr.Warning(str(err))
            return None, None, "", f"⚠ {err}"
        request_dir = work_dir / f"request-{next(request_numbers)}"
        request_dir.mkdir(parents=True)
        mask_files = []
        for k, result in enumerate(results, 1):
            path = request_dir / f"mask-{k}.png"
            image_io.save_mask_png(result.mask, path)
            mask_files.append(str(path))
        gallery = gr.Gallery([(r.overlay, caption(r, latency_ms))
                              for r in results], columns=len(results))
        return gallery, mask_files, summary_markdown(results, latency_ms, compiled), ""

    # Uploads and results in Gradio's cache go after an hour (the samples stay).
    with gr.Blocks(title="magnet_jax demo", analytics_enabled=False,
                   delete_cache=(3600, 3600)) as app:
        gr.Markdown(
            "# magnet_jax: referring image segmentation\n"
            f"{model.description}.\n\n"
            "Upload an image or pick a sample, type what to segment (one sentence per line, "
            f"up to {limits.max_sentences}, compared side by side) and press **Segment**. "
            f"Images: {limits.describe()}. **The first request compiles the model** (tens of "
            "seconds on a CPU; once more the first time 2 or 3–4 sentences are sent); later "
            "requests take milliseconds.")
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"],
                                 height=320, elem_id="image")
                text = gr.Textbox(label=f"Sentences (one per line, up to {limits.max_sentences})",
                                  lines=3, max_lines=limits.max_sentences + 2,
                                  placeholder="the red circle on the left", elem_id="sentences")
                button = gr.Button("Segment", variant="primary", elem_id="segment")
                message = gr.Markdown(elem_id="message")
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="Masks overlaid, one per sentence", columns=1,
                                     height="auto", object_fit="contain", format="png",
                                     allow_preview=False, elem_id="overlays")
                summary = gr.Markdown(elem_id="summary")
                masks = gr.File(label="Binary masks (PNG, 255 = the referred object)",
                                file_count="multiple", interactive=False, elem_id="masks")
        gr.Examples([[s.image, s.sentence] for s in model.samples], [image, text],
                    label="Samples: synthetic scenes of the val and held-out splits (never "
                          "trained on) and a photo",
                    elem_id="samples")
        # Enter in the multi-line box starts a new sentence; the button sends.
        button.click(run, [image, text], [gallery, masks, summary, message], preprocess=False)
    return app


# Small images (the 64-pixel synthetic scenes) fill the input box instead of sitting in a
# corner; the captions wrap instead of being cut after a few words; the gallery is as tall
# as its row of results.
PAGE_CSS = """
#image img { width: 100%; height: 100%; object-fit: contain; }
#overlays .caption-label { white-space: normal; max-width: 100%; }
#overlays .fixed-height { min-height: 0; }
"""


def theme():
    import gradio as gr
    return gr.themes.Default(font=list(SANS_FONTS), font_mono=list(MONO_FONTS))


def serve(model: DemoModel, host: str = "127.0.0.1", port: int = 7860,
          limits: Limits = Limits(), block: bool = True, quiet: bool = False):
    """Serve the page on host:port. block=False returns (app, url) with the server running in
    a thread (`app.close()` stops it)."""
    work = tempfile.TemporaryDirectory(prefix="magnet_jax_demo_")
    app = build_app(model, limits, Path(work.name))
    app.magnet_jax_work_dir = work      # the mask files go when the app does
    _, url, _ = app.launch(
        server_name=host, server_port=port, share=False, prevent_thread_lock=not block,
        quiet=quiet, theme=theme(), css=PAGE_CSS, max_file_size=limits.max_image_bytes,
        footer_links=["api", "settings"], run_history=False, enable_monitoring=False,
        mcp_server=False, ssr_mode=False, pwa=False)
    return app, url


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m magnet_jax.demo",
                                description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="converted weights, a training workdir or WORKDIR/params")
    p.add_argument("--step", help="training workdirs: latest (default), best or a step number")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--max-image-mb", type=float, default=DEFAULT_MAX_IMAGE_MB,
                   help=f"largest image file in MB of 2**20 bytes (default "
                        f"{DEFAULT_MAX_IMAGE_MB:g}); larger ones are refused with a message")
    p.add_argument("--max-image-side", type=int, default=DEFAULT_MAX_IMAGE_SIDE,
                   help=f"largest image width or height in px (default "
                        f"{DEFAULT_MAX_IMAGE_SIDE}); larger ones are refused with a message")
    args = p.parse_args(argv)
    if args.max_image_mb <= 0 or args.max_image_side <= 0:
        p.error("--max-image-mb and --max-image-side must be positive")
    return args


def main(argv=None) -> int:
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    logging.getLogger("absl").setLevel(logging.ERROR)   # orbax's read-only manager notices
    args = _parse(argv)
    from magnet_jax import compilation_cache
    from magnet_jax.restore import RestoreError
    compilation_cache.enable()
    limits = Limits(int(args.max_image_mb * MB), args.max_image_side)
    samples = tempfile.TemporaryDirectory(prefix="magnet_jax_demo_samples_")
    try:
        model = load_demo_model(args.checkpoint, args.step, Path(samples.name))
    except (RestoreError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log.info("%s", model.description)
    try:
        app, url = serve(model, args.host, args.port, limits, block=False, quiet=True)
    except OSError as err:     # the port is taken, or the address is not this machine's
        reason = ("the port is in use; choose another with --port"
                  if "empty port" in str(err) else str(err).splitlines()[0])
        print(f"error: cannot serve on {args.host}:{args.port}: {reason}", file=sys.stderr)
        samples.cleanup()
        return 2
    log.info("serving on %s (the first request compiles the model; Ctrl+C stops)", url)
    # SIGTERM (`kill`, a service manager) stops like Ctrl+C: the temporary files go too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        app.block_thread()
    finally:
        app.close()
        samples.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
