"""Benchmark prompts: a JSONL file, the real model's chat prompts, or held-out tiny-teacher text.

A prompts file holds one JSON object per line, each one of:

* ``{"input_ids": [int, ...]}``: token ids, used as they are;
* ``{"messages": [{"role": "user", "content": "..."}, ...]}``: rendered with the
  tokenizer's chat template (Harmony for gpt-oss), generation prompt appended;
* ``{"prompt": "..."}``: plain text, or a single user message when ``chat`` is on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# A small, fixed set of chat prompts for the real model (rendered in Harmony format by the
# gpt-oss tokenizer's chat template). Kept short and diverse: code, math, prose, lists.
DEFAULT_CHAT_PROMPTS = [
    "Write a Python function that merges two sorted lists into one sorted list, with a docstring.",
    "Explain, step by step, how to compute the derivative of x^3 * sin(x).",
    "Summarize the causes of the French Revolution in five bullet points.",
    "Write a bash script that finds the 10 largest files under the current directory.",
    "What is the difference between a process and a thread? Answer in two paragraphs.",
    "Implement binary search in C and explain its time complexity.",
    "Give me a recipe for a simple tomato soup, with quantities.",
    "Translate into French: 'The weather is nice today, let us go for a walk in the park.'",
]


def _encode_record(record: dict[str, Any], tokenizer: Any, chat: bool, where: str) -> list[int]:
    if "input_ids" in record:
        ids = [int(t) for t in record["input_ids"]]
    elif "messages" in record:
        ids = _chat_ids(tokenizer, record["messages"])
    elif "prompt" in record:
        text = str(record["prompt"])
        ids = _chat_ids(tokenizer, [{"role": "user", "content": text}]) if chat else tokenizer.encode(text)
    else:
        raise ValueError(f"{where}: expected a key 'input_ids', 'messages' or 'prompt', got {sorted(record)}.")
    if not ids:
        raise ValueError(f"{where}: the prompt encodes to zero tokens.")
    return ids


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat prompts need a tokenizer with a chat template (gpt-oss ships the Harmony one).")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def load_prompts_file(path: str | Path, tokenizer: Any, *, chat: bool = False) -> list[list[int]]:
    """Token ids of every prompt in a JSONL file; errors name the file and line."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"prompts file {str(file)!r} does not exist.")
    prompts = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{file}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg}).") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: each line must be a JSON object.")
        prompts.append(_encode_record(record, tokenizer, chat, where))
    if not prompts:
        raise ValueError(f"prompts file {str(file)!r} holds no prompts.")
    return prompts


def default_chat_prompts(tokenizer: Any, num_prompts: int) -> list[list[int]]:
    """The built-in chat prompts (cycled to ``num_prompts``), Harmony-formatted."""
    return [
        _chat_ids(tokenizer, [{"role": "user", "content": DEFAULT_CHAT_PROMPTS[i % len(DEFAULT_CHAT_PROMPTS)]}])
        for i in range(num_prompts)
    ]
