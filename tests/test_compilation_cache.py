"""magnet_jax.compilation_cache: where the persistent XLA cache goes, when it stays off, and
that a second process loads what the first compiled."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from magnet_jax import compilation_cache

REPO = Path(__file__).resolve().parents[1]
OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture
def pristine(monkeypatch):
    """No cache directory configured (the session's own, from conftest, is put back after)."""
    saved = {name: getattr(jax.config, name) for name in OPTIONS}
    for var in ("JAX_COMPILATION_CACHE_DIR", "MAGNET_JAX_CACHE_DIR",
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"):
        monkeypatch.delenv(var, raising=False)
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


@pytest.mark.parametrize("value", ["off", "OFF", "0", "none", ""])
def test_env_switch_off_leaves_config_unset(pristine, monkeypatch, value):
    monkeypatch.setenv("MAGNET_JAX_CACHE_DIR", value)
    assert compilation_cache.enable() is None
    assert jax.config.jax_compilation_cache_dir is None
    assert compilation_cache.current_directory() is None


def test_default_directory_resolution(tmp_path):
    home = str(tmp_path / "home")
    assert compilation_cache.default_directory({"HOME": home}) == \
        os.path.join(home, ".cache", "magnet_jax", "xla")
    assert compilation_cache.default_directory({"HOME": home, "XDG_CACHE_HOME": "/xdg"}) == \
        os.path.join("/xdg", "magnet_jax", "xla")
    # A relative XDG_CACHE_HOME is invalid (XDG spec): ignored.
    assert compilation_cache.default_directory({"HOME": home, "XDG_CACHE_HOME": "rel"}) == \
        os.path.join(home, ".cache", "magnet_jax", "xla")
    # MAGNET_JAX_CACHE_DIR wins over XDG_CACHE_HOME; ~ is expanded.
    assert compilation_cache.default_directory(
        {"HOME": home, "XDG_CACHE_HOME": "/xdg", "MAGNET_JAX_CACHE_DIR": "/mine"}) == "/mine"
    assert compilation_cache.default_directory({"HOME": home, "MAGNET_JAX_CACHE_DIR": "~/c"}) \
        == os.path.join(home, "c")


def test_enable_sets_and_creates_directory(pristine, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    expected = str(tmp_path / "xdg" / "magnet_jax" / "xla")
    assert compilation_cache.enable() == expected
    assert os.path.isdir(expected)
    assert jax.config.jax_compilation_cache_dir == expected
    assert jax.config.jax_persistent_cache_min_compile_time_secs == \
        compilation_cache.MIN_COMPILE_TIME_SECS
    assert jax.config.jax_persistent_cache_min_entry_size_bytes == 0
    # Idempotent, and a later MAGNET_JAX_CACHE_DIR does not move a configured cache.
    monkeypatch.setenv("MAGNET_JAX_CACHE_DIR", str(tmp_path / "other"))
    assert compilation_cache.enable() == expected
    assert not (tmp_path / "other").exists()


def test_user_set_directory_is_respected(pristine, monkeypatch, tmp_path):
    monkeypatch.setenv("MAGNET_JAX_CACHE_DIR", str(tmp_path / "ours"))
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "theirs"))
    assert compilation_cache.enable() == str(tmp_path / "theirs")
    assert compilation_cache.enable(tmp_path / "explicit") == str(tmp_path / "theirs")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "theirs")
    assert not (tmp_path / "ours").exists() and not (tmp_path / "explicit").exists()
    # JAX_COMPILATION_CACHE_DIR set after `import jax` (JAX read it at import): still theirs.
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
    assert compilation_cache.enable() == str(tmp_path / "env")
    assert not (tmp_path / "ours").exists()


def test_session_cache_is_kept():
    """The test session's directory (conftest.py) stays in force."""
    assert compilation_cache.enable() == os.environ["JAX_COMPILATION_CACHE_DIR"]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_unusable_directory_warns_once_and_continues(pristine, monkeypatch, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("MAGNET_JAX_CACHE_DIR", str(blocker / "xla"))
    # Our own handler: "magnet_jax" may not propagate to caplog's (train._quiet_logs).
    logger, records = logging.getLogger("magnet_jax.compilation_cache"), _Records()
    logger.addHandler(records)
    try:
        assert compilation_cache.enable() is None
        assert compilation_cache.enable() is None
    finally:
        logger.removeHandler(records)
    assert len([m for m in records.messages if "compilation cache disabled" in m]) == 1
    assert jax.config.jax_compilation_cache_dir is None


class _Called(Exception):
    pass


def test_entry_points_enable_the_cache(monkeypatch, tmp_path):
    """Each entry point calls enable() before it compiles (or loads) anything."""
    def called(*_):
        raise _Called

    monkeypatch.setattr(compilation_cache, "enable", called)
    from magnet_jax import evaluate, export, predict, train
    from magnet_jax.training import loop

    out = str(tmp_path / "m.png")
    for run in (lambda: predict.main(["--demo", "--out", out]),
                lambda: predict.Predictor(None, None),
                lambda: evaluate.main(["--checkpoint", str(tmp_path)]),
                lambda: export.main(["--checkpoint", str(tmp_path), "--out", out]),
                lambda: train.main(["train"]),
                lambda: loop.train(None, tmp_path / "w")):
        with pytest.raises(_Called):
            run()


_SCRIPT = """
import json, jax, jax.numpy as jnp
from magnet_jax import compilation_cache
events = []
jax.monitoring.register_event_listener(lambda event, **kw: events.append(event))
directory = compilation_cache.enable()
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum() + jnp.cos(x).mean())
f(jnp.ones((8, 8))).block_until_ready()
print("RESULT", json.dumps({"dir": directory,
      "hits": events.count("/jax/compilation_cache/cache_hits"),
      "misses": events.count("/jax/compilation_cache/cache_misses")}))
"""


def test_second_process_loads_from_the_cache(tmp_path):
    cache = tmp_path / "xla"
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR",)}
    env.update(MAGNET_JAX_CACHE_DIR=str(cache), JAX_PLATFORMS="cpu",
               # the small function compiles in well under the default 1 s threshold
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))

    def run():
        proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
        return json.loads(line[len("RESULT "):])

    first = run()
    assert first["dir"] == str(cache)
    assert first["hits"] == 0 and first["misses"] >= 1
    entries = [p for p in cache.rglob("*") if p.is_file()]
    assert entries, "the first process wrote nothing to the cache"
    second = run()
    assert second["hits"] >= 1 and second["misses"] == 0, second
