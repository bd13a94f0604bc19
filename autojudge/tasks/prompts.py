"""Zero-shot chat prompts for mining; `{question}` in a template is replaced by the problem text."""

from __future__ import annotations

from autojudge.errors import AutojudgeError
from autojudge.tasks.datasets import Problem

DEFAULT_TEMPLATES = {
    "gsm8k": (
        "Solve the following math problem step by step. "
        "At the end, put the final answer after 'The answer is'.\n\n{question}"
    ),
    "humaneval": (
        "Complete the following Python function. Reply with the complete function, "
        "including its signature, in a single ```python code block.\n\n```python\n{question}```"
    ),
}


def build_messages(problem: Problem, template: str | None = None) -> list[dict]:
    template = template or DEFAULT_TEMPLATES[problem.task]
    if "{question}" not in template:
        raise AutojudgeError("--prompt-template must contain '{question}' where the problem text goes")
    # str.replace, not format: problem texts and code templates are full of braces.
    return [{"role": "user", "content": template.replace("{question}", problem.question)}]
