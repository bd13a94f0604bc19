"""Tokenizer loading, prompt encoding and the draft/target vocabulary check."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from autojudge.errors import AutojudgeError


def load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    logging.getLogger("transformers").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return AutoTokenizer.from_pretrained(directory)
        except (OSError, ValueError) as err:
            raise AutojudgeError(f"no usable tokenizer in {directory}: {str(err).splitlines()[0][:200]}") from None


def check_compatible(target_tok, draft_tok, target_name: str, draft_name: str):
    """The draft's token ids must mean the same strings as the target's for every id both know."""
    target_vocab = {i: s for s, i in target_tok.get_vocab().items()}
    draft_vocab = {i: s for s, i in draft_tok.get_vocab().items()}
    shared = min(len(target_vocab), len(draft_vocab))
    for i in range(shared):
        if target_vocab.get(i) != draft_vocab.get(i):
            raise AutojudgeError(
                f"draft/target tokenizer mismatch: token id {i} is {target_vocab.get(i)!r} in the target ({target_name}) "
                f"but {draft_vocab.get(i)!r} in the draft ({draft_name}); pick a draft from the target's model family"
            )


# A chat model's code answer ends where its code block closes (the checkers read the first block).
CODE_FENCE = "```"


def end_of_answer_ids(tokenizer, eos_token_ids) -> set[int]:
    """End-of-sequence ids and every token that holds a code fence: the target's choices to end an answer, or the
    code block that is its answer, which no lossy rule may overrule (a judge mined on "does the answer stay right"
    calls a draft that goes on writing test code after the block harmless, and answers grow)."""
    return set(eos_token_ids) | {i for text, i in tokenizer.get_vocab().items() if CODE_FENCE in text}


CHAT_ROLES = ("system", "user", "assistant")


def encode_prompt(tokenizer, prompt, vocab_size: int) -> list[int]:
    """str: chat template applied (raw text if the tokenizer has none); chat messages; token ids used as-is."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise AutojudgeError("empty prompt: give some text, chat messages or token ids")
        prompt = [{"role": "user", "content": prompt}]
        if not getattr(tokenizer, "chat_template", None):
            return tokenizer.encode(prompt[0]["content"], add_special_tokens=True)
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        if not getattr(tokenizer, "chat_template", None):
            raise AutojudgeError("this tokenizer has no chat template: pass the prompt as text or token ids")
        if not all({"role", "content"} <= m.keys() for m in prompt):
            raise AutojudgeError("chat messages need 'role' and 'content' keys")
        bad = next((m for m in prompt if m["role"] not in CHAT_ROLES or not isinstance(m["content"], str)), None)
        if bad is not None:
            raise AutojudgeError(f"chat message {bad!r}: role must be one of {', '.join(CHAT_ROLES)} and content a "
                                 "string")
        text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise AutojudgeError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        return list(prompt)
    raise AutojudgeError("prompt must be a non-empty string, a list of chat messages, or a list of token ids")
