"""Engine outputs in OpenAI's response shapes: usage, logprobs, completion choices and deltas."""
from __future__ import annotations

from vllm_jax.engine.outputs import CompletionOutput, RequestOutput
from vllm_jax.server.protocol import APIError, error_body


def error_event(e: APIError) -> dict:
    return error_body(e.message, e.status, e.param)


def usage(prompt_tokens: int, outputs: list[RequestOutput | None], generated: bool = True) -> dict:
    completion = sum(len(c.token_ids) for o in outputs if o for c in o.outputs) if generated else 0
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def token_str(tok, token_id: int, as_id: bool = False) -> str:
    return f"token_id:{token_id}" if as_id else tok.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tok, c: CompletionOutput, top: int, start: int = 0, as_ids: bool = False) -> dict:
    """{"content": [{token, logprob, bytes, top_logprobs}]} for c's tokens from `start` on."""
    content = []
    for token_id, entry in zip(c.token_ids[start:], (c.logprobs or [])[start:]):
        ranked = sorted((lp.rank, t, lp.logprob) for t, lp in entry.items() if lp.rank)[:top]
        s = token_str(tok, token_id, as_ids)
        content.append({
            "token": s, "logprob": entry[token_id].logprob, "bytes": list(s.encode()),
            "top_logprobs": [{"token": ts, "logprob": v, "bytes": list(ts.encode())}
                             for ts, v in ((token_str(tok, t, as_ids), v) for _, t, v in ranked)]})
    return {"content": content}


class CompletionView:
    """What /v1/completions returns per choice: the echoed prompt (with its logprobs) first,
    then the generated text; `delta` gives the not-yet-sent part for streaming."""

    def __init__(self, tok, req, texts: list[str | None], prompt_ids: list[list[int]],
                 echo_only: bool):
        self.tok, self.n, self.echo, self.logprobs = tok, req.n, req.echo, req.logprobs
        self.texts, self.prompt_ids, self.echo_only = texts, prompt_ids, echo_only
        self.as_ids = req.return_tokens_as_token_ids
        self._sent: dict[tuple[int, int], tuple[int, int]] = {}
        self._strs: dict[int, str] = {}

    def usage(self, outputs) -> dict:
        return usage(sum(map(len, self.prompt_ids)), outputs, generated=not self.echo_only)

    def choice(self, i: int, out: RequestOutput, c: CompletionOutput) -> dict:
        text, ids, entries = self._parts(i, out, c)
        return self._choice(i, c, text, self._logprobs(ids, entries, 0))

    def delta(self, i: int, out: RequestOutput, c: CompletionOutput) -> dict | None:
        done = c.finish_reason is not None
        if self.echo_only and not done:
            return None
        text, ids, entries = self._parts(i, out, c)
        chars, tokens = self._sent.get((i, c.index), (0, 0))
        if len(text) == chars and not done:
            return None
        self._sent[(i, c.index)] = (len(text), len(ids))
        return self._choice(i, c, text[chars:], self._logprobs(ids[tokens:], entries[tokens:],
                                                               chars), done)

    def _choice(self, i, c, text, logprobs, done=True) -> dict:
        finish = ("length" if self.echo_only else c.finish_reason) if done else None
        return {"index": i * self.n + c.index, "text": text, "logprobs": logprobs,
                "finish_reason": finish,
                "stop_reason": None if self.echo_only or not done else c.stop_reason}

    def _parts(self, i: int, out: RequestOutput, c: CompletionOutput):
        """(text, token ids, logprob entries) of a choice, echoed prompt included."""
        text, ids, entries = c.text, list(c.token_ids), list(c.logprobs or [])
        if self.echo_only:
            text, ids, entries = "", [], []
        if self.echo:
            prompt = self.prompt_ids[i]
            shown = self.texts[i]
            if shown is None:
                shown = self.tok.decode(prompt, skip_special_tokens=False)
            text, ids = shown + text, prompt + ids
            entries = list(out.prompt_logprobs or [None] * len(prompt)) + entries
        return text, ids, entries

    def _str(self, token_id: int) -> str:
        s = self._strs.get(token_id)
        if s is None:
            s = self._strs[token_id] = token_str(self.tok, token_id, self.as_ids)
        return s

    def _logprobs(self, ids: list[int], entries: list, offset: int) -> dict | None:
        if self.logprobs is None:
            return None
        out = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
        for token_id, entry in zip(ids, entries):
            s = self._str(token_id)
            out["tokens"].append(s)
            out["text_offset"].append(offset)
            offset += len(s)
            if entry is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(entry[token_id].logprob)
            out["top_logprobs"].append({self._str(t): lp.logprob for t, lp in entry.items()})
        return out
