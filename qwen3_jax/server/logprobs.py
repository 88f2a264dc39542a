"""The engine's per-token log-probabilities ({token id: logprob}, the chosen token first) in OpenAI's two shapes."""

from __future__ import annotations

import functools
import math


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet back to bytes (the printable stand-ins byte-level BPE writes tokens in)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The raw bytes of one token (a piece of a multi-byte character stays a piece)."""
    if tokenizer is None:
        return f"token_id:{token_id}".encode()
    piece = tokenizer.id_to_token(token_id)
    if piece is None:
        return b""
    table = _byte_decoder()
    if all(ch in table for ch in piece):
        return bytes(table[ch] for ch in piece)
    return tokenizer.decode([token_id]).encode()  # an added token (<think>), written as itself


def token_text(tokenizer, token_id: int) -> str:
    return token_bytes(tokenizer, token_id).decode("utf-8", errors="replace")


def _value(x: float) -> float:
    return x if math.isfinite(x) else -9999.0  # JSON has no -inf; OpenAI's floor for impossible tokens


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    # the entry holds the chosen token and the k most likely; sorted, the first k are the most likely
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


def chat_logprobs(tokenizer, token_ids: list[int], entries: list[dict[int, float]], k: int) -> list[dict]:
    """`choices[i].logprobs.content` of a chat completion."""
    out = []
    for t, entry in zip(token_ids, entries):
        b = token_bytes(tokenizer, t)
        out.append({"token": b.decode("utf-8", errors="replace"), "logprob": _value(entry[t]), "bytes": list(b),
                    "top_logprobs": [{"token": token_text(tokenizer, u), "logprob": _value(v),
                                      "bytes": list(token_bytes(tokenizer, u))} for u, v in _top(entry, k)]})
    return out


def completion_logprobs(tokenizer, token_ids: list[int], entries: list[dict[int, float]], k: int,
                        offset: int = 0) -> dict:
    """`choices[i].logprobs` of a (legacy) completion: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens = [token_text(tokenizer, t) for t in token_ids]
    offsets, pos = [], offset
    for s in tokens:
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": [_value(e[t]) for t, e in zip(token_ids, entries)],
            "top_logprobs": [{token_text(tokenizer, u): _value(v) for u, v in _top(e, k)} for e in entries],
            "text_offset": offsets}
