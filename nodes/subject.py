"""Resolve the subject words ("sks dog", ``embedding:my_cat``) to token positions of the target prompt.

WHY: the foreground mask is the cross-attention of the *subject tokens* (docs/method.md, "Subject mask").
Users must
never count tokens, and the positions must match the conditioning tensor exactly, including
textual-inversion vectors and prompts longer than one 77-token chunk. So we tokenize with the very
CLIP object that encodes the prompt, and search the subject's own tokenization inside the prompt's.

This module only calls methods of the CLIP object handed to it (``clip.tokenize``); it imports no
ComfyUI module.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

#: Tokenizer keys in order of preference. SDXL's "g" and "l" share one token layout (the
#: conditioning concatenates them along channels), so either gives the same positions.
_PREFERRED_KEYS = ("l", "g")

_WORD_RE = re.compile(r"embedding:[^\s,()\[\]]+|[^\s,.;!?()\[\]{}\"]+")


def prompt_words(prompt: str) -> list[str]:
    """The prompt's words as a user would name them (for error messages)."""
    return [w for w in _WORD_RE.findall(prompt) if not re.fullmatch(r"[:\d.]+", w)]


def _same_token(a: Any, b: Any) -> bool:
    """Integer ids compare by value; TI vectors (tensors) compare exactly."""
    a_t, b_t = isinstance(a, torch.Tensor), isinstance(b, torch.Tensor)
    if a_t or b_t:
        return a_t and b_t and a.shape == b.shape and torch.equal(a, b)
    return a == b


def _content_tokens(tokens: dict, key: str) -> list[tuple[Any, int]]:
    """(token, conditioning index) of every real token (word id > 0) of one tokenizer's chunks.

    ComfyUI encodes each chunk separately and concatenates along the token axis, so the index of
    position ``p`` in chunk ``c`` is the summed length of the earlier chunks plus ``p``. Start,
    end and padding tokens carry word id 0 and are skipped.
    """
    out: list[tuple[Any, int]] = []
    offset = 0
    for chunk in tokens[key]:
        for pos, item in enumerate(chunk):
            token, word_id = item[0], item[2]
            if word_id > 0:
                out.append((token, offset + pos))
        offset += len(chunk)
    return out


def _pick_key(tokens: dict) -> str:
    for key in _PREFERRED_KEYS:
        if key in tokens:
            return key
    if not tokens:
        raise ValueError("The CLIP tokenizer returned no tokens; connect the CLIP that encodes your prompt.")
    return next(iter(tokens))


def find_subsequence(haystack: Sequence[Any], needle: Sequence[Any]) -> list[int]:
    """Start positions of every occurrence of ``needle`` in ``haystack`` (token-wise equality)."""
    n = len(needle)
    if n == 0:
        return []
    return [
        i
        for i in range(len(haystack) - n + 1)
        if all(_same_token(haystack[i + j], needle[j]) for j in range(n))
    ]


def _hint(subject: str, prompt: str) -> str:
    words = prompt_words(prompt)
    example = " ".join(words[-2:]) if words else "sks dog"
    return (
        f"The target prompt's words are: {', '.join(words) if words else '(none)'}. "
        f"Type in 'subject' one or more consecutive words exactly as they appear in the target prompt "
        f"(e.g. '{example}'), or 'embedding:NAME' for a textual-inversion subject; "
        f"or set mask_mode to 'none' to use no foreground mask."
    )


def resolve_subject(clip: Any, prompt: str, subject: str) -> tuple[int, ...]:
    """Token indices (along the conditioning's token axis) of every occurrence of ``subject`` in ``prompt``.

    Raises ``ValueError`` with an actionable message when the subject cannot be found.
    An empty subject resolves to ``()`` (no mask tokens).
    """
    subject = subject.strip()
    if not subject:
        return ()
    if clip is None:
        raise ValueError(
            f"The subject '{subject}' must be found in the target prompt, so connect the CLIP that encodes "
            "your target prompt to the 'clip' input of Match Settings (or Semantic Match), and the prompt "
            "text to 'target_prompt'."
        )
    if not prompt.strip():
        raise ValueError(
            f"The subject '{subject}' must be found in the target prompt, but 'target_prompt' is empty. "
            "Type (or link) the same text you give CLIPTextEncode for the target's positive prompt."
        )
    prompt_tokens = clip.tokenize(prompt, return_word_ids=True)
    key = _pick_key(prompt_tokens)
    subject_tokens = clip.tokenize(subject, return_word_ids=True)
    if key not in subject_tokens:
        key = _pick_key(subject_tokens)
    needle = [tok for tok, _ in _content_tokens(subject_tokens, key)]
    if not needle:
        hint = ""
        if "embedding:" in subject:
            hint = (" ComfyUI could not load that embedding: put the file in models/embeddings "
                    "(the extension is optional in the prompt) and check the spelling.")
        raise ValueError(f"The subject '{subject}' produced no tokens.{hint} {_hint(subject, prompt)}")
    haystack = _content_tokens(prompt_tokens, key)
    starts = find_subsequence([tok for tok, _ in haystack], needle)
    if not starts:
        raise ValueError(f"The subject '{subject}' is not in the target prompt. {_hint(subject, prompt)}")
    indices = {haystack[s + j][1] for s in starts for j in range(len(needle))}
    return tuple(sorted(indices))
