"""Judge files: `<stem>.safetensors` (folded `weight` [D] fp32, `bias` [1] fp32) + `<stem>.json` metadata.

Score convention (both kinds): p_important = sigmoid(features @ weight + bias), and the decoder
accepts a draft token that differs from the target's when p_important < threshold. Features are
fp32 last-layer hidden states (after the final norm) at the position whose input is the draft
token: DT = target hidden; DD-DT = concat(draft hidden, target hidden), draft first.
Judge Decoding heads are stored the same way: "important" there means "at or after the first error".
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import pickle
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file

from autojudge.engine.loading import read_safetensors
from autojudge.engine.request import JUDGE_MODES, check_threshold
from autojudge.errors import AutojudgeError
from autojudge.judge.features import BLOCKS, trained_on
from autojudge.judge.train import TrainResult

FORMAT = "autojudge-judge"
VERSION = 1
RESTORE = "restore the judge or retrain it with `autojudge train`"


def judge_paths(path: str | Path) -> tuple[Path, Path]:
    """(.safetensors, .json) for a path given as either file or the common stem."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_judge(stem: str | Path, result: TrainResult, feature_meta: dict) -> tuple[Path, Path]:
    """Write the judge pair; feature_meta: kind, setup, hidden_sizes, fingerprints, models."""
    st_path, json_path = judge_paths(stem)
    st_path.parent.mkdir(parents=True, exist_ok=True)
    weight, bias = result.head.folded()
    save_file(
        {"weight": weight.to(torch.float32).contiguous(), "bias": torch.tensor([bias], dtype=torch.float32)},
        str(st_path),
    )
    setup = feature_meta["setup"]
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "kind": feature_meta["kind"],
        "setup": setup,
        "feature_blocks": list(BLOCKS[setup]),
        "hidden_sizes": feature_meta["hidden_sizes"],
        "fingerprints": feature_meta["fingerprints"],
        "models": feature_meta["models"],
        "dtypes": feature_meta["dtypes"],
        "trained_on": trained_on(feature_meta),
        "score": "p_important = sigmoid(features @ weight + bias); accept a mismatch when p_important < threshold",
        "thresholds": result.thresholds,
        "default_threshold": result.default_threshold,
        "report": result.report,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    json_path.write_text(json.dumps(meta, indent=2) + "\n")
    return st_path, json_path


def export_vllm(path: str | Path, result: TrainResult, setup: str) -> Path:
    """Pickle {mean, scale, weights, bias, thr, thresholds} as the AutoJudge authors' vLLM fork loads it.

    Their `JudgeConfig(weights=, mean=, scale=, bias=, threshold=)` is filled from `pickle.load` of
    this dict (garipovroma/autojudge, src/train_head_*.py `--convert_to_vllm`, eval/vllm_gsm8k.py),
    with numpy arrays as scikit-learn produces them and target-only (DT) features.
    """
    if setup != "DT":
        raise AutojudgeError(
            f"the AutoJudge vLLM integration reads target-only features, but this judge uses {setup}; "
            "retrain with `autojudge train --setup DT ... --export vllm`"
        )
    head = result.head
    data = {
        "mean": head.scaler.mean.numpy().copy(),
        "scale": head.scaler.scale.numpy().copy(),
        "weights": head.weight.numpy().copy(),
        "bias": torch.tensor([head.bias], dtype=torch.float64).numpy(),
        "thr": result.default_threshold["value"],
        "thresholds": sorted(result.thresholds["quantile"].values()),
    }
    out = Path(path)
    with out.open("wb") as f:
        pickle.dump(data, f)
    return out


@dataclass
class Judge:
    weight: torch.Tensor  # [D] fp32, folded, on the target's device
    bias: torch.Tensor  # [1] fp32, on the CPU so float(bias) never waits on the GPU
    setup: str
    thresholds: dict
    meta: dict

    @property
    def uses_draft(self) -> bool:
        return "draft" in BLOCKS[self.setup]

    @property
    def fingerprint(self) -> str:
        """Names the head's weights: two files give the same scores exactly when their fingerprints agree."""
        folded = torch.cat([self.weight.detach().cpu(), self.bias.detach().cpu()]).to(torch.float32)
        return hashlib.sha256(folded.numpy().tobytes()).hexdigest()[:16]

    def p_important(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(features.to(torch.float32) @ self.weight + float(self.bias))

    @property
    def default_threshold(self) -> float:
        """The threshold stored with the judge; the engine decodes with it unless given another."""
        stored = self.meta.get("default_threshold")
        if stored is None:
            raise AutojudgeError("this judge stores no default threshold; pass a threshold")
        return check_threshold(stored["value"])

    def threshold_for(self, recall: float | None = None, threshold: float | None = None) -> float:
        """An explicit threshold, the one reaching `recall` of important tokens, or the file's default."""
        if recall is not None and threshold is not None:
            raise AutojudgeError("give a judge recall level or a threshold, not both")
        if threshold is not None:
            return check_threshold(threshold)
        if recall is None:
            return self.default_threshold
        for key, tau in self.thresholds["recall"].items():
            if math.isclose(float(key), recall):
                return float(tau)
        raise AutojudgeError(
            f"this judge has thresholds for recall {', '.join(self.thresholds['recall'])}, not {recall}; "
            "pick one of those or pass an explicit threshold"
        )


def _short(fp: str | None) -> str:
    return fp[:12] if fp else "none"


def _check_model(meta: dict, block: str, dec, path: Path) -> None:
    want_fp = meta["fingerprints"].get(block)
    want_size = meta["hidden_sizes"][block]
    if dec is None:
        raise AutojudgeError(
            f"judge {path.name} ({meta['setup']}) needs a {block} model ({meta['models'].get(block)}, "
            f"fingerprint {_short(want_fp)}), but none is loaded; load it or retrain with "
            "`autojudge train --setup DT` for these models"
        )
    if dec.fingerprint != want_fp or dec.config.hidden_size != want_size:
        raise AutojudgeError(
            f"judge {path.name} was trained for {block} {meta['models'].get(block)} "
            f"(fingerprint {_short(want_fp)}, hidden {want_size}) but the loaded {block} is {dec.name} "
            f"(fingerprint {_short(dec.fingerprint)}, hidden {dec.config.hidden_size}); "
            "retrain with `autojudge train` for these models"
        )


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_level(key: str) -> bool:
    try:
        return 0.0 <= float(key) <= 1.0
    except ValueError:
        return False


def _meta_problem(meta: dict) -> str | None:
    """What makes the metadata of a current-format judge unusable, or None; load_judge reads only these fields."""
    missing = [k for k in ("kind", "setup", "hidden_sizes", "fingerprints", "models", "thresholds") if k not in meta]
    if missing:
        return f"it lacks {', '.join(missing)}"
    if meta["kind"] not in KIND_FOR_MODE.values():
        return f"kind {meta['kind']!r} is not one of {', '.join(KIND_FOR_MODE.values())}"
    if not isinstance(meta["setup"], str) or meta["setup"] not in BLOCKS:
        return f"setup {meta['setup']!r} is not one of {', '.join(BLOCKS)}"
    not_objects = [k for k in ("hidden_sizes", "fingerprints", "models", "thresholds") if not isinstance(meta[k], dict)]
    if not_objects:
        return f"{', '.join(not_objects)} must be JSON objects"
    for block in BLOCKS[meta["setup"]]:
        size = meta["hidden_sizes"].get(block)
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            return f"hidden_sizes.{block} is {size!r}, not a positive integer"
        if not isinstance(meta["fingerprints"].get(block), str):
            return f"fingerprints.{block} is {meta['fingerprints'].get(block)!r}, not a string"
    recall = meta["thresholds"].get("recall")
    if not isinstance(recall, dict) or not all(_is_level(k) and _number(v) for k, v in recall.items()):
        return "thresholds.recall is not an object of recall levels to thresholds"
    default = meta.get("default_threshold")
    if default is not None and not (isinstance(default, dict) and _number(default.get("value"))):
        return f"default_threshold is {default!r}, not an object with a numeric value"
    return None


def _read_meta(json_path: Path) -> dict:
    raw = json_path.read_bytes()
    try:
        meta = json.loads(raw)
    except ValueError as err:  # UnicodeDecodeError included
        problem = "it is empty" if not raw.strip() else f"it is not JSON ({err})"
        raise AutojudgeError(f"judge metadata {json_path} is damaged: {problem}; {RESTORE}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise AutojudgeError(
            f"{json_path} is not a version-{VERSION} autojudge judge file; retrain with `autojudge train`"
        )
    problem = _meta_problem(meta)
    if problem is not None:
        raise AutojudgeError(f"judge metadata {json_path} is damaged: {problem}; {RESTORE}")
    return meta


def load_judge(path: str | Path, target, draft=None) -> Judge:
    """Load a judge and refuse it unless it was trained for these target (and, for DD-DT, draft) models."""
    st_path, json_path = judge_paths(path)
    for p in (st_path, json_path):
        if not p.is_file():
            raise AutojudgeError(f"judge file {p} not found; a judge is a .safetensors + .json pair")
    meta = _read_meta(json_path)
    setup = meta["setup"]
    for block in BLOCKS[setup]:
        _check_model(meta, block, target if block == "target" else draft, json_path)
    # On the target's device: the verify step reads the weight there every cycle.
    tensors = read_safetensors(st_path, fix=RESTORE, device=str(target.device))
    missing = [k for k in ("weight", "bias") if k not in tensors]
    if missing:
        raise AutojudgeError(f"{st_path} holds no {' or '.join(missing)} tensor; {RESTORE}")
    weight, bias = tensors["weight"].to(torch.float32), tensors["bias"].to(torch.float32).cpu()
    expected = sum(meta["hidden_sizes"][b] for b in BLOCKS[setup])
    if weight.shape != (expected,) or bias.shape != (1,):
        raise AutojudgeError(
            f"{st_path} holds weight {tuple(weight.shape)} / bias {tuple(bias.shape)} but its metadata "
            f"expects ({expected},) / (1,); the pair is inconsistent, retrain with `autojudge train`"
        )
    return Judge(weight, bias, setup, meta["thresholds"], meta)


SHIPPED_JUDGES = "judges"
KIND_FOR_MODE = dict(zip(JUDGE_MODES, ("autojudge", "judge-decoding"), strict=True))
# The heads shipped for the default pair, by (kind, domain): a judge learns which mismatches matter in the text it
# was mined on, so math and code each have their own. --judge default picks the one for the mode and the task
# (math for free prompts); default-math and default-code name a domain.
SHIPPED_DEFAULT = {("autojudge", "math"): "default.json", ("judge-decoding", "math"): "default-judge-decoding.json",
                   ("autojudge", "code"): "default-code.json"}
DOMAIN_OF_TASK = {"gsm8k": "math", "humaneval": "code"}
DEFAULT_JUDGE_NAMES = {"default": None, "default-math": "math", "default-code": "code"}


def _shipped(kind: str, domain: str) -> Path | None:
    name = SHIPPED_DEFAULT.get((kind, domain))
    shipped = resources.files("autojudge") / SHIPPED_JUDGES / name if name else None
    return Path(str(shipped)) if shipped is not None and shipped.is_file() else None


def load_judge_for_engine(path: str | Path, engine, mode: str | None = None, task: str | None = None) -> Judge:
    """`path`, or a shipped head for the default pair: 'default' (for `mode`, an AutoJudge head when mode is None,
    and for `task`'s domain, math when None), 'default-math' or 'default-code'. Checked against the engine's
    models and, when `mode` is given, against the kind of head that mode decodes with."""
    if str(path) in DEFAULT_JUDGE_NAMES:
        kind = KIND_FOR_MODE.get(mode, "autojudge")
        domain = DEFAULT_JUDGE_NAMES[str(path)] or DOMAIN_OF_TASK.get(task, "math")
        path = _shipped(kind, domain)
        if path is None:
            other = next((d for k, d in SHIPPED_DEFAULT if k == kind and d != domain and _shipped(k, d)), None)
            hint = f", or pass --judge default-{other} to use the {other} one" if other else ""
            raise AutojudgeError(f"no default {kind} judge for {domain} is shipped in this version; train one with "
                                 f"`autojudge train` and pass --judge PATH{hint}")
    judge = load_judge(path, target=engine.target, draft=engine.draft)
    want = KIND_FOR_MODE.get(mode)
    if want is not None and judge.meta["kind"] != want:
        raise AutojudgeError(
            f"judge {path} is a {judge.meta['kind']} head but mode {mode!r} needs a {want} head; "
            f"use mode {next(m for m, k in KIND_FOR_MODE.items() if k == judge.meta['kind'])!r} or another judge"
        )
    return judge
