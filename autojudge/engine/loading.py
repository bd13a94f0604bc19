"""Resolving a model source (checkpoint dir, local hub cache id, GGUF file, `default`) to weights + tokenizer.

GGUF files are dequantized once through transformers and cached as a safetensors checkpoint keyed by the
file's sha256: the first load takes minutes, every later one seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from filelock import FileLock
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from autojudge.engine import default_pair
from autojudge.engine.config import ModelConfig
from autojudge.engine.model import Transformer
from autojudge.errors import AutojudgeError

GGUF_MAGIC = b"GGUF"
# Any one of these lets transformers build a Llama/Qwen2 tokenizer; without them it silently builds an empty one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
_SIZES = [f.name for f in fields(ModelConfig) if f.type == "int"]


@dataclass(frozen=True)
class Checkpoint:
    """A Hugging Face style directory: config.json, *.safetensors, tokenizer files."""

    name: str
    directory: Path
    weights_sha256: str | None = None  # known without hashing the weights: a GGUF checkpoint's source file digest

    @property
    def hf_config(self) -> dict:
        return _json_object(self.directory / "config.json")

    @property
    def config(self) -> ModelConfig:
        try:
            config = ModelConfig.from_hf(self.hf_config, source=str(self.directory))
        except KeyError as err:
            raise AutojudgeError(f"{self.directory / 'config.json'} lacks {err.args[0]!r}; restore the checkpoint's "
                                 "config.json") from None
        except (TypeError, ValueError) as err:
            raise AutojudgeError(f"{self.directory / 'config.json'} holds a value of the wrong type ({err}); restore "
                                 "the checkpoint's config.json") from None
        bad = next((k for k in _SIZES if not (isinstance(getattr(config, k), int) and getattr(config, k) > 0)), None)
        if bad is not None:
            raise AutojudgeError(f"{self.directory / 'config.json'} gives {bad} = {getattr(config, bad)!r}, not a "
                                 "positive integer; restore the checkpoint's config.json")
        return config

    @property
    def weight_files(self) -> list[Path]:
        return sorted(self.directory.glob("*.safetensors"))

    def weights_fingerprint(self) -> str:
        """sha256 over the weight files: labels mined from a model depend on its exact weights, which the
        architecture fingerprint does not see."""
        if self.weights_sha256 is not None:
            return self.weights_sha256
        listing = "".join(f"{f.name} {file_sha256(f)}\n" for f in self.weight_files)
        return hashlib.sha256(listing.encode()).hexdigest()

    def eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        for file in ("config.json", "generation_config.json"):
            path = self.directory / file
            if path.exists():
                eos = _json_object(path).get("eos_token_id")
                eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
                if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in eos):
                    raise AutojudgeError(f"{path}: eos_token_id {eos!r} is not a token id or a list of them; "
                                         f"restore the checkpoint's {file}")
                ids.update(eos)
        return ids


def _json_object(path: Path) -> dict:
    """A checkpoint's JSON file; a damaged one is named with the fix, not a parser traceback."""
    try:
        data = json.loads(path.read_bytes())
    except ValueError as err:  # UnicodeDecodeError included
        raise AutojudgeError(f"{path} is not valid JSON ({err}); restore the checkpoint's {path.name}") from None
    if not isinstance(data, dict):
        raise AutojudgeError(f"{path} is not a JSON object; restore the checkpoint's {path.name}")
    return data


def resolve(source: str, role: str) -> Checkpoint:
    """`role` ("target" or "draft") picks the member of the default pair when source is "default"."""
    if source == "default":
        spec = default_pair.DEFAULT_TARGET if role == "target" else default_pair.DEFAULT_DRAFT
        return _from_gguf(default_pair.assembled_gguf(spec), name=f"default-{role}", known_sha256=spec.sha256)
    path = Path(source).expanduser()
    if path.is_dir():
        return _checked(Checkpoint(name=str(path), directory=path))
    if path.is_file():
        return _from_gguf(path, name=str(path))
    if "/" in source and not source.startswith((".", "/", "~")) and source.count("/") == 1:
        return _checked(Checkpoint(name=source, directory=_from_hub_cache(source)))
    raise AutojudgeError(
        f"model not found: {source!r} is not a checkpoint directory, a GGUF file, a model in the local "
        f"Hugging Face cache, or 'default'"
    )


def _checked(ckpt: Checkpoint) -> Checkpoint:
    """Fails on what a checkpoint directory lacks before anything loads from it."""
    path = ckpt.directory
    if not (path / "config.json").exists():
        raise AutojudgeError(f"{path} is not a Hugging Face checkpoint: it has no config.json")
    # Parsed first: the tokenizer reads config.json too, and would blame itself for a damaged one.
    ckpt.config  # noqa: B018
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        raise AutojudgeError(f"{path} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); copy the tokenizer files "
                             "of the model into it")
    return ckpt


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime): hashing gigabytes of weights takes seconds to minutes."""
    path = path.resolve()
    st = path.stat()
    seen = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    memo = default_pair.cache_root() / "sha256" / f"{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.json"
    try:
        stored = json.loads(memo.read_text())
    except (OSError, ValueError):
        stored = None
    if isinstance(stored, dict) and {k: stored.get(k) for k in seen} == seen and isinstance(stored.get("sha256"), str):
        return stored["sha256"]
    digest = default_pair.sha256_file(path)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}.partial")
        tmp.write_text(json.dumps({**seen, "sha256": digest}))
        tmp.replace(memo)
    except OSError:
        pass  # the memo only saves time: without a writable cache the next load hashes again
    return digest


def read_safetensors(path: Path, fix: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a truncated or damaged one is named with `fix`, not a parser error."""
    try:
        return load_file(path, device=device)
    except SafetensorError as err:
        raise AutojudgeError(f"{path} is not a readable safetensors file ({err}): it is truncated or damaged; {fix}"
                             ) from None


def _from_hub_cache(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError) as err:
        raise AutojudgeError(
            f"model not found: {repo_id!r} is not in the local Hugging Face cache and nothing is downloaded here; "
            f"download it elsewhere and pass the checkpoint directory ({type(err).__name__})"
        ) from None


def _from_gguf(path: Path, name: str, known_sha256: str | None = None) -> Checkpoint:
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise AutojudgeError(f"{path} is not a GGUF file (bad magic bytes); pass a .gguf file or a checkpoint directory")
    digest = known_sha256 or file_sha256(path)
    out = default_pair.cache_root() / "converted" / digest[:32]
    if not (out / "model.safetensors").exists():
        # Two processes loading the same new GGUF (parallel mining shards, say) convert it once.
        out.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{out}.lock"):
            if not (out / "model.safetensors").exists():
                _convert_gguf(path, out)
    return Checkpoint(name=name, directory=out, weights_sha256=digest)


def _convert_gguf(path: Path, out: Path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    logging.getLogger("transformers").setLevel(logging.ERROR)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
            ModelConfig.from_hf(config.to_dict(), source=str(path))  # fail fast on an unknown architecture
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except AutojudgeError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as err:  # transformers/gguf raise many types for damaged files
        shutil.rmtree(tmp, ignore_errors=True)
        raise AutojudgeError(
            f"could not read GGUF file {path}: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}; "
            f"the file is corrupt or truncated: fetch it again"
        ) from None
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, tmp / "model.safetensors")
    config.architectures = [type(model).__name__]
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def load_weights(ckpt: Checkpoint, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> Transformer:
    files = ckpt.weight_files
    if not files:
        raise AutojudgeError(f"{ckpt.directory} has no *.safetensors weights; save the model with safe_serialization")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(read_safetensors(file, fix="fetch or convert the checkpoint again"))
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Transformer(config)
    expected = set(model.state_dict().keys()) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise AutojudgeError(
            f"{ckpt.name}: weights do not match the {config.architecture} architecture "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); is config.json from this checkpoint?"
        )
    wrong = [(k, tuple(state[k].shape), tuple(p.shape)) for k, p in model.state_dict().items()
             if k in state and state[k].shape != p.shape]
    if wrong:
        name, got, want = wrong[0]
        raise AutojudgeError(
            f"{ckpt.name}: {name} has shape {got} but config.json implies {want} ({len(wrong)} tensors differ); "
            "is config.json from this checkpoint?"
        )
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True, strict=False)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(device).eval().requires_grad_(False)
