"""A persistent XLA compilation cache, on by default in every entry point that compiles.

`enable()` points JAX's persistent compilation cache at a directory, so a second process that
compiles the same computation (a resumed training run, another `predict` call) loads the
executable from disk instead of compiling it again. Called at the start of `python -m
magnet_jax.train / .evaluate / .predict / .export`, in `training.loop.train` and in
`predict.Predictor.__init__`; it is cheap and idempotent.

Where the cache lives:
  $MAGNET_JAX_CACHE_DIR                   if set (`off`, `0`, `none`, `false` or empty: no cache)
  $XDG_CACHE_HOME/magnet_jax/xla          otherwise, when XDG_CACHE_HOME is set
  ~/.cache/magnet_jax/xla                 otherwise

A directory already configured (JAX_COMPILATION_CACHE_DIR, or jax.config's
jax_compilation_cache_dir set by the caller) is left as it is, as is a cache disabled with
jax_enable_compilation_cache=False. A directory that cannot be created logs one warning and
the program runs without the cache.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

ENV_VAR = "MAGNET_JAX_CACHE_DIR"
OFF_VALUES = ("", "0", "off", "none", "false", "no")
# Computations that compile faster than this are not written (JAX's default is 1 s as well; a
# JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS set by the user wins).
MIN_COMPILE_TIME_SECS = 1.0
MIN_ENTRY_SIZE_BYTES = 0

_warned: set[str] = set()


def default_directory(environ=None) -> str | None:
    """The cache directory from the environment; None when MAGNET_JAX_CACHE_DIR turns it off."""
    environ = os.environ if environ is None else environ
    home = environ.get("HOME") or os.path.expanduser("~")

    def expand(path: str) -> str:
        if path == "~" or path.startswith("~" + os.sep):
            path = home + path[1:]
        return path

    if ENV_VAR in environ:
        value = environ[ENV_VAR].strip()
        if value.lower() in OFF_VALUES:
            return None
        return os.path.abspath(expand(value))
    base = expand(environ.get("XDG_CACHE_HOME", "").strip())
    if not os.path.isabs(base):  # unset, empty or relative (invalid per the XDG spec)
        base = os.path.join(home, ".cache")
    return os.path.join(base, "magnet_jax", "xla")


def _read(jax, name: str):
    """An option's current value (None when this JAX version has no such option). Options
    with a context manager, as these are, are read as attributes (`config.read` refuses)."""
    return getattr(jax.config, name, None)


def _update_unless_user_set(jax, name: str, value) -> None:
    """Set an option unless its JAX_* environment variable chose it (JAX reads those at import)."""
    if name.upper() in os.environ:
        return
    try:
        jax.config.update(name, value)
    except (AttributeError, ValueError, TypeError):  # option renamed or removed in this JAX
        log.debug("jax config option %s is not available; left as it is", name)


def current_directory() -> str | None:
    """The persistent cache directory JAX is configured with (None: no persistent cache)."""
    import jax

    if _read(jax, "jax_enable_compilation_cache") is False:
        return None
    return _read(jax, "jax_compilation_cache_dir") or None


def enable(directory: str | os.PathLike | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache; returns the directory in use (None: off).

    directory: the cache directory (default: `default_directory()`, from MAGNET_JAX_CACHE_DIR /
    XDG_CACHE_HOME). A cache directory already configured is kept, and a cache disabled with
    jax_enable_compilation_cache=False stays disabled; an explicit `directory` does not
    override either. Never raises for an unusable directory: it warns once and returns None.
    """
    import jax

    if _read(jax, "jax_enable_compilation_cache") is False:
        return None
    configured = _read(jax, "jax_compilation_cache_dir")
    if configured:
        return configured
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        # Set after `import jax` (JAX reads it only at import): still the user's choice.
        directory = os.environ["JAX_COMPILATION_CACHE_DIR"]
    elif directory is None:
        directory = default_directory()
        if directory is None:
            return None
    directory = os.path.abspath(os.path.expanduser(os.fspath(directory)))
    try:
        os.makedirs(directory, exist_ok=True)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(f"not writable: {directory}")
    except OSError as err:
        if directory not in _warned:
            _warned.add(directory)
            log.warning("compilation cache disabled: cannot use %s (%s); set %s to another "
                        "directory or to 'off'", directory, err, ENV_VAR)
        return None
    _update_unless_user_set(jax, "jax_persistent_cache_min_compile_time_secs",
                            MIN_COMPILE_TIME_SECS)
    _update_unless_user_set(jax, "jax_persistent_cache_min_entry_size_bytes",
                            MIN_ENTRY_SIZE_BYTES)
    jax.config.update("jax_compilation_cache_dir", directory)
    log.debug("persistent compilation cache: %s", directory)
    return directory
