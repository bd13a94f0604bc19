"""Judge features from mined labels (AutoJudge) or annotated responses (Judge Decoding), with a cache.

A feature is the fp32 last-layer hidden state (after the final norm) at the position whose input is
the token being judged, computed by the engine's own decoders: DT = target only, DD-DT =
concat(draft, target), draft first. Labels are stored as `important` (see judge_file for the score
convention); for annotations a token is important when it is at or after the first error.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from autojudge.errors import AutojudgeError
from autojudge.jsonl import read_jsonl
from autojudge.judge.labels import inflight_path, read_label_rows
from autojudge.progress import progress

SETUPS = ("DD-DT", "DT")
BLOCKS = {"DT": ("target",), "DD-DT": ("draft", "target")}
CACHE_VERSION = 2  # 2: bf16 hidden states on a CPU attend over an fp32 KV cache (engine/model.py)
SAVE_EVERY_S = 120.0  # a killed feature run loses at most this much work


@dataclass
class FeatureSet:
    features: torch.Tensor  # [N, D] fp32
    important: torch.Tensor  # [N] bool
    groups: list[str]  # per row; validation splits never separate a group
    meta: dict  # key, kind, setup, hidden_sizes, fingerprints, models, source, source_sha256


def check_label_models(path: Path, eng, setup: str) -> None:
    """A mining file's meta row names the models that made its labels; features from other models would train
    a judge for pairs it never saw."""
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.readline()
    try:
        meta = json.loads(first)
    except json.JSONDecodeError:
        return  # read_label_rows names the bad line
    if not isinstance(meta, dict) or meta.get("kind") != "meta":
        return
    for block in BLOCKS[setup]:
        want, dec = meta.get(f"{block}_fingerprint"), getattr(eng, block)
        if want is not None and dec is not None and dec.fingerprint != want:
            raise AutojudgeError(
                f"{path} was mined with {block} {meta.get(block)} (fingerprint {want[:12]}), but the loaded {block} "
                f"is {dec.name} (fingerprint {dec.fingerprint[:12]}); pass --{block} {meta.get(block)} or mine "
                "labels with these models"
            )


def good_tokens(offsets: list[tuple[int, int]], first_error: int | None) -> list[bool]:
    """A response token is good iff it ends at or before the first error, so the token containing it is bad."""
    if first_error is None:
        return [True] * len(offsets)
    return [end <= first_error for _, end in offsets]


def _hidden(dec, ids: list[int]) -> torch.Tensor:
    """Hidden states [T, D] fp32 of one fresh pass; teacher_forced without the [T, vocab] logits."""
    tokens = torch.as_tensor(ids, dtype=torch.long, device=dec.device)
    if int(tokens.min()) < 0 or int(tokens.max()) >= dec.config.vocab_size:
        raise AutojudgeError(
            f"token ids outside [0, {dec.config.vocab_size}) for {dec.name}; the file was made with other models"
        )
    return dec.forward(tokens, 0, logits_from=None)[1].float()


class Checkpoint:
    """Per work item (a pass, a response), the tensors computed so far, kept in `path` with the cache key at most
    every SAVE_EVERY_S seconds (written aside and renamed, so never half-written): a killed feature run resumes
    from it. None as path keeps nothing."""

    def __init__(self, path: Path | None = None, key: str = ""):
        self.path, self.key = path, key
        self.done: dict[int, dict[str, torch.Tensor]] = {}
        self.saved_at = time.monotonic()
        if path is not None and path.is_file():
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") == key:
                    for name in f.keys():
                        item, field = name.split(".", 1)
                        self.done.setdefault(int(item), {})[field] = f.get_tensor(name)

    def add(self, item: int, **tensors: torch.Tensor) -> None:
        self.done[item] = tensors
        if self.path is not None and time.monotonic() - self.saved_at >= SAVE_EVERY_S:
            tmp = self.path.with_name(self.path.name + ".tmp")
            save_file({f"{i}.{k}": v.contiguous() for i, d in self.done.items() for k, v in d.items()}, str(tmp),
                      metadata={"key": self.key})
            os.replace(tmp, self.path)
            self.saved_at = time.monotonic()

    def remove(self) -> None:
        """Called once the finished features are saved."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _shared_passes(prompts: list[tuple], seqs: list[tuple]) -> tuple[list[tuple], list[int]]:
    """Fewest passes covering every sequence, and per row the pass holding it as a prefix.

    With causal attention the hidden state at position t depends on tokens 0..t only, so a row whose
    sequence starts a longer one (a prefix kept after an unimportant mismatch) reuses that pass.
    """
    passes: list[tuple] = []
    by_prompt: dict[tuple, list[int]] = defaultdict(list)
    owner = [0] * len(seqs)
    for i in sorted(range(len(seqs)), key=lambda i: -len(seqs[i])):
        s = seqs[i]
        bucket = by_prompt[prompts[i]]
        hit = next((p for p in bucket if passes[p][: len(s)] == s), None)
        if hit is None:
            hit = len(passes)
            passes.append(s)
            bucket.append(hit)
        owner[i] = hit
    return passes, owner


def _label_sequence(row: dict) -> list[int]:
    return [*row["prompt_ids"], *row["prefix_ids"], row["draft_token"]]


def model_identity(eng) -> dict:
    """What stored features were computed with: the same models in the same precision give the same features."""
    return {block: {"fingerprint": dec.fingerprint, "weights": dec.weights_fingerprint, "dtype": dec.precision}
            for block, dec in (("draft", eng.draft), ("target", eng.target)) if dec is not None}


class StoredFeatures:
    """DD-DT features that `autojudge mine` saved as it labelled (`<labels>.features/`, one file a label, named
    by a hash of the label's sequence): the hidden states its own forwards computed at the draft token, so
    training need not run the models again (~50 ms a token of each label sequence in fp32 on the 2-core CPU). fp16 on disk
    (~5 KB a label for the default pair); a label without a file, or one from other models or another
    precision, has its features computed as usual."""

    def __init__(self, directory: Path, identity: dict):
        self.directory = Path(directory)
        self.identity = json.dumps(identity, sort_keys=True)

    @staticmethod
    def for_labels(labels: Path) -> Path:
        return labels.with_name(labels.name + ".features")

    def _path(self, sequence: list[int]) -> Path:
        return self.directory / (hashlib.sha256(json.dumps(sequence).encode()).hexdigest()[:24] + ".safetensors")

    def save(self, row: dict, hidden: dict[str, torch.Tensor]) -> None:
        """hidden: block ("draft", "target") -> fp32 [D] at the draft token of label `row`."""
        stored = {block: h.detach().to("cpu", torch.float16).contiguous() for block, h in hidden.items()}
        if not all(torch.isfinite(h).all() for h in stored.values()):
            return  # out of fp16's range: training computes this one
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(_label_sequence(row))
        staging = path.with_name(path.name + ".tmp")
        save_file(stored, str(staging), metadata={"models": self.identity})
        os.replace(staging, path)

    def load(self, row: dict, setup: str) -> torch.Tensor | None:
        """The row's features for `setup` (fp32), or None when none were stored for these models."""
        path = self._path(_label_sequence(row))
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("models") != self.identity:
                    return None
                return torch.cat([f.get_tensor(block).float() for block in BLOCKS[setup]])
        except (OSError, ValueError, KeyError):
            return None  # unreadable or lacking a block: computed as usual


def label_features(eng, rows: list[dict], setup: str, checkpoint: Checkpoint | None = None,
                   stored: StoredFeatures | None = None) -> torch.Tensor:
    """[N, D] features at the draft token of each row: sequence = prompt + prefix + [draft_token]. Rows in
    `stored` and passes already in `checkpoint` are not run again."""
    decs = _decoders(eng, setup)
    checkpoint = checkpoint or Checkpoint()
    out = torch.empty(len(rows), sum(d.config.hidden_size for d in decs), dtype=torch.float32)
    found = {i: f for i, f in enumerate(stored.load(r, setup) for r in rows) if f is not None} if stored else {}
    for i, f in found.items():
        out[i] = f
    todo = [i for i in range(len(rows)) if i not in found]
    prompts = [tuple(rows[i]["prompt_ids"]) for i in todo]
    seqs = [tuple(_label_sequence(rows[i])) for i in todo]
    passes, owner = _shared_passes(prompts, seqs)
    rows_of = defaultdict(list)
    for j, p in enumerate(owner):
        rows_of[p].append(j)
    # A checkpointed pass is known by its tokens and the positions it serves, not its index: which rows were
    # stored may differ on a resume.
    positions = [[len(seqs[j]) - 1 for j in rows_of[p]] for p in range(len(passes))]
    items = [int(hashlib.sha256(json.dumps([list(s), at]).encode()).hexdigest()[:15], 16)
             for s, at in zip(passes, positions)]
    already = sum(item in checkpoint.done for item in items)
    with progress(total=len(passes), initial=already, desc="features", unit="seq") as bar:
        for p, item in enumerate(items):
            idx = rows_of[p]
            if item not in checkpoint.done:
                pos = torch.tensor(positions[p])
                hidden = torch.cat([_hidden(d, list(passes[p])).cpu() for d in decs], dim=-1)
                checkpoint.add(item, rows=hidden[pos])
                bar.update()
            out[[todo[j] for j in idx]] = checkpoint.done[item]["rows"]
    return out


def annotation_features(eng, path: Path, checkpoint: Checkpoint | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Target hidden state at every response token (input = that token), important = at/after first error.
    Responses already in `checkpoint` are not run again."""
    checkpoint = checkpoint or Checkpoint()
    feats, important, groups = [], [], []
    annotations = read_jsonl(path)
    # Responses the checkpoint holds go by in no time: the bar counts them as they pass.
    for n, (lineno, ann) in enumerate(progress(iterable=annotations, desc="features", unit="response")):
        if isinstance(ann, dict) and ann.get("kind") == "header":  # how the file was made (`autojudge annotate`)
            continue
        if not isinstance(ann, dict) or not isinstance(ann.get("response"), str) or "prompt" not in ann:
            raise AutojudgeError(f"{path}:{lineno}: an annotation needs 'prompt', 'response' and 'first_error'")
        response, first_error = ann["response"], ann.get("first_error")
        if first_error is not None and not (isinstance(first_error, int) and 0 <= first_error <= len(response)):
            raise AutojudgeError(
                f"{path}:{lineno}: first_error must be null or a character offset in [0, {len(response)}], "
                f"got {first_error!r}"
            )
        try:
            enc = eng.tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:
            raise AutojudgeError("Judge Decoding annotations need a fast tokenizer (token offsets)") from None
        if not enc["input_ids"]:
            continue
        if n not in checkpoint.done:
            prompt_ids = eng.encode_prompt(ann["prompt"])
            checkpoint.add(n, hidden=_hidden(eng.target, prompt_ids + enc["input_ids"])[len(prompt_ids):].cpu())
        hidden = checkpoint.done[n]["hidden"]
        feats.append(hidden)
        important.append(~torch.tensor(good_tokens(enc["offset_mapping"], first_error)))
        group = ann.get("problem_id", ann.get("id", f"annotation-{n}"))
        groups.extend([str(group)] * hidden.shape[0])
    if not feats:
        raise AutojudgeError(f"{path} holds no non-empty annotated responses")
    return torch.cat(feats), torch.cat(important), groups


def _decoders(eng, setup: str) -> list:
    if setup not in BLOCKS:
        raise AutojudgeError(f"unknown feature setup {setup!r}; choose one of {', '.join(SETUPS)}")
    if "draft" in BLOCKS[setup] and eng.draft is None:
        raise AutojudgeError(f"setup {setup} needs the draft model's hidden states; pass --draft or use --setup DT")
    return [eng.draft if b == "draft" else eng.target for b in BLOCKS[setup]]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def describe(eng, source: Path, kind: str, setup: str, unfinished: bool = False) -> dict:
    """Everything the features depend on; `key` hashes it so a stale cache is never reused."""
    decs = dict(zip(BLOCKS[setup], _decoders(eng, setup)))
    meta = {
        "version": CACHE_VERSION,
        "kind": kind,
        "setup": setup,
        "source_sha256": file_sha256(source),
        "hidden_sizes": {b: d.config.hidden_size for b, d in decs.items()},
        "fingerprints": {b: d.fingerprint for b, d in decs.items()},
        # Hidden states computed in bf16 differ from fp32 ones; a cache made in one is stale for the other.
        "dtypes": {b: d.precision for b, d in decs.items()},
    }
    if unfinished:
        inflight = inflight_path(source)
        # Hashed before the rows are read: rows checkpointed in between only make a later run's key differ.
        meta["unfinished_sha256"] = file_sha256(inflight) if inflight.is_file() else None
    meta["key"] = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    meta["models"] = {b: d.name for b, d in decs.items()}
    meta["source"] = str(source)
    return meta


def default_cache_path(source: Path, meta: dict) -> Path:
    return source.with_name(f"{source.name}.{meta['setup']}.{meta['key'][:12]}.features.safetensors")


def save_features(path: Path, fs: FeatureSet) -> None:
    names = sorted(set(fs.groups))
    index = {g: i for i, g in enumerate(names)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            "features": fs.features.contiguous(),
            "important": fs.important.to(torch.uint8),
            "group": torch.tensor([index[g] for g in fs.groups], dtype=torch.int64),
        },
        str(path),
        metadata={"autojudge_features": json.dumps(fs.meta), "groups": json.dumps(names)},
    )


def load_features(path: Path) -> FeatureSet:
    with safe_open(str(path), framework="pt") as f:
        info = f.metadata() or {}
        if "autojudge_features" not in info:
            raise AutojudgeError(f"{path} is not an autojudge feature file; make one with `autojudge features`")
        names = json.loads(info["groups"])
        return FeatureSet(
            features=f.get_tensor("features"),
            important=f.get_tensor("important").bool(),
            groups=[names[i] for i in f.get_tensor("group").tolist()],
            meta=json.loads(info["autojudge_features"]),
        )


def _cached(path: Path, meta: dict) -> FeatureSet | None:
    """The features at `path` when they were made for exactly `meta` (same key), else None."""
    if path.is_file():
        cached = load_features(path)
        if cached.meta.get("key") == meta["key"]:
            return cached
    return None


def feature_set(eng, labels: Path | None = None, annotations: Path | None = None, setup: str | None = None,
                cache: Path | None = None, unfinished: bool = False) -> tuple[FeatureSet, Path, bool]:
    """(features, cache path, whether the cache was reused) for exactly one of labels / annotations; `unfinished`:
    the labels' file with the checkpointed labels of its unfinished problems."""
    if (labels is None) == (annotations is None):
        raise AutojudgeError("give exactly one of --labels (AutoJudge) or --annotations (Judge Decoding)")
    if unfinished and labels is None:
        raise AutojudgeError("--unfinished reads the problems still in flight of a --labels file; drop it")
    source = Path(labels or annotations)
    kind = "autojudge" if labels is not None else "judge-decoding"
    setup = setup or ("DD-DT" if kind == "autojudge" else "DT")
    if kind == "judge-decoding" and setup != "DT":
        raise AutojudgeError("Judge Decoding features are the target's hidden states only; use --setup DT")
    if kind == "autojudge":
        check_label_models(source, eng, setup)
    meta = describe(eng, source, kind, setup, unfinished)
    path = Path(cache) if cache is not None else default_cache_path(source, meta)
    cached = _cached(path, meta)
    if cached is not None:
        return cached, path, True
    if kind == "autojudge" and setup == "DT" and eng.draft is not None:
        # DT features are the target block of DD-DT ones (the same passes of the same target): reuse those.
        both = describe(eng, source, kind, "DD-DT", unfinished)
        cached = _cached(default_cache_path(source, both), both)
        if cached is not None:
            target_block = cached.features[:, -eng.target.config.hidden_size :].contiguous()
            fs = FeatureSet(target_block, cached.important, cached.groups, meta)
            save_features(path, fs)
            return fs, path, True
    checkpoint = Checkpoint(path.with_name(path.name + ".partial"), meta["key"])
    if kind == "autojudge":
        rows = read_label_rows(source, unfinished)
        stored = StoredFeatures(StoredFeatures.for_labels(source), model_identity(eng))
        feats = label_features(eng, rows, setup, checkpoint, stored)
        important = torch.tensor([bool(r["important"]) for r in rows])
        groups = [str(r["problem_id"]) for r in rows]
    else:
        feats, important, groups = annotation_features(eng, source, checkpoint)
    fs = FeatureSet(feats, important, groups, meta)
    save_features(path, fs)
    checkpoint.remove()
    return fs, path, False


def merge_feature_sets(sets: list[FeatureSet]) -> FeatureSet:
    """One training set from several label files made for the same models (problem ranges mined in turn, or in
    another precision): rows concatenated, a problem that appears in two files kept as one validation group."""
    if len(sets) == 1:
        return sets[0]
    meta = {k: v for k, v in sets[0].meta.items() if k not in ("source", "source_sha256", "unfinished_sha256", "key")}
    meta["sources"] = [source for fs in sets for source in trained_on(fs.meta)]
    return FeatureSet(torch.cat([fs.features for fs in sets]), torch.cat([fs.important for fs in sets]),
                      [g for fs in sets for g in fs.groups], meta)


def trained_on(meta: dict) -> list[dict]:
    """The label or annotation files a feature set came from, as a judge file records them."""
    if "sources" in meta:
        return meta["sources"]
    files = [{"file": Path(meta["source"]).name, "sha256": meta["source_sha256"]}]
    if meta.get("unfinished_sha256"):
        files.append({"file": inflight_path(Path(meta["source"])).name, "sha256": meta["unfinished_sha256"]})
    return files

