import os

# Triton kernels must see the interpreter flag before they are defined; tests run them on the CPU.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("AUTOJUDGE_QUIET", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from autojudge.testing import make_tiny_checkpoint  # noqa: E402

# Tiny models gain nothing from a second thread and lose ~50x on a busy 2-core machine to thread handoffs;
# the real-model tests ask for all cores themselves.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def exact_cpu_dtype(monkeypatch):
    """`--dtype auto` picks bf16 on CPUs with native bf16; the CLI tests compare outputs token for token, which
    only fp32 guarantees, whatever processor CI runs on. Tests of the choice itself undo this."""
    monkeypatch.setattr("autojudge.engine.engine.cpu_has_native_bf16", lambda: False)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_qwen(tiny_dir):
    return make_tiny_checkpoint(tiny_dir / "qwen2", arch="qwen2", seed=0)


@pytest.fixture(scope="session")
def tiny_llama(tiny_dir):
    return make_tiny_checkpoint(tiny_dir / "llama", arch="llama", seed=1)


@pytest.fixture(scope="session")
def tiny_pair(tiny_dir, tiny_qwen):
    """(target_dir, draft_dir): the draft is the target plus noise, so it agrees often but not always."""
    base = load_file(tiny_qwen / "model.safetensors")
    base["lm_head.weight"] = base["model.embed_tokens.weight"]
    draft = make_tiny_checkpoint(tiny_dir / "qwen2-draft", arch="qwen2", seed=2, base_state=base, noise=0.01)
    return tiny_qwen, draft


@pytest.fixture(scope="session")
def tiny_unrelated_draft(tiny_dir):
    return make_tiny_checkpoint(tiny_dir / "qwen2-unrelated", arch="qwen2", seed=7)
