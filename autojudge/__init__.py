"""autojudge: lossy speculative decoding (AutoJudge, Judge Decoding) on a static-KV-cache engine."""

from autojudge.engine.engine import Engine, GenerationOutput, GenerationStats
from autojudge.engine.request import TopkRule
from autojudge.errors import AutojudgeError

__all__ = ["Engine", "GenerationOutput", "GenerationStats", "TopkRule", "AutojudgeError"]
