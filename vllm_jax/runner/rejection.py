"""The on-device rejection sampler of speculative decoding.

Row r's position j (0..k) holds the target's logits after r's last token and its first j
proposals. p_j is the distribution the plain sampler (runner/sampler.py) draws from at that
point: the same min_tokens bans and penalties (over a history holding the j proposals), the
same temperature, top-k, top-p and min-p, with output step + j. A sampled row accepts proposal
x with probability min(1, p_j(x) / q_j(x)) and, at the first rejection, draws from
norm(max(0, p_j - q_j)); when all are accepted it draws a bonus token from p_k. So the tokens
it emits are distributed as the plain sampler's. A greedy row accepts while the proposal is
p_j's argmax, then emits the argmax.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vllm_jax.runner.sampler import SamplingArrays, argmax, constrain, filter_logits, logprobs


def expand(s: SamplingArrays, history, num_prompt, num_tokens, positions: int):
    """Each row's parameters repeated for its `positions` positions, row-major: position j
    samples output token step + j, and its penalty history is the row's first
    num_tokens [S] + j tokens."""
    j = jnp.tile(jnp.arange(positions, dtype=jnp.int32), s.step.shape[0])

    def rep(x):
        return jnp.repeat(x, positions, axis=0)

    expanded = SamplingArrays(*(rep(x) for x in s))._replace(step=rep(s.step) + j)
    if history is not None:
        visible = jnp.arange(history.shape[1])[None, :] < (rep(num_tokens) + j)[:, None]
        history, num_prompt = jnp.where(visible, rep(history), -1), rep(num_prompt)
    return expanded, history, num_prompt


def position_keys(s: SamplingArrays):
    """One PRNG key per row of `s`: its seed folded with its output step."""
    return jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(
        s.seed.astype(jnp.uint32), s.step)


def rejection_sample(p, drafts, q, keys):
    """p [S, K+1, V] target probabilities; drafts [S, K] (-1: no proposal); q [S, K, V] the
    proposals' distributions (None: point masses, as for n-gram proposals); keys [S, K+1].
    -> (tokens [S, K+1]: at each position, the draw made there if it rejects, or the bonus;
    accepted [S, K] bool)."""
    s, k1, vocab = p.shape
    if q is None:
        q = jax.nn.one_hot(drafts, vocab, dtype=p.dtype)  # -1 gives a zero row
    q = jnp.where((drafts >= 0)[..., None], q, 0.0)  # no proposal: the residual is p
    x = jnp.maximum(drafts, 0)[..., None]
    px = jnp.take_along_axis(p[:, :-1], x, axis=-1)[..., 0]
    qx = jnp.take_along_axis(q, x, axis=-1)[..., 0]
    flat_keys = keys.reshape(-1)
    u = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, 1)))(flat_keys)
    accepted = (drafts >= 0) & (u.reshape(s, k1)[:, :-1] * qx < px)
    residual = jnp.maximum(p[:, :-1] - q, 0.0)
    residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p[:, :-1])
    dist = jnp.concatenate([residual, p[:, -1:]], axis=1).reshape(-1, vocab)
    gumbel = jax.vmap(lambda key: jax.random.gumbel(jax.random.fold_in(key, 2), (vocab,)))(
        flat_keys)
    return argmax(jnp.log(dist) + gumbel).reshape(s, k1), accepted


def verify(logits, s: SamplingArrays, history, num_prompt, num_tokens, drafts, draft_probs, *,
           greedy_only: bool, want_logprobs: bool) -> dict:
    """logits [S*(K+1), V] (row-major by row, then position); s, history, num_prompt as the
    plain sampler takes them for the S rows; num_tokens [S] each row's tokens before its
    proposals. -> tokens [S, K+1] (the first num_accepted + 1 are emitted), num_accepted [S],
    and the emitted tokens' logprobs when asked."""
    rows, k = drafts.shape
    e, history, num_prompt = expand(s, history, num_prompt, num_tokens, k + 1)
    constrained = constrain(logits, e, history, num_prompt)
    tokens = argmax(constrained).reshape(rows, k + 1)
    accepted = drafts == tokens[:, :-1]
    if not greedy_only:
        p = jax.nn.softmax(filter_logits(constrained, e), axis=-1).reshape(rows, k + 1, -1)
        drawn, drawn_accepted = rejection_sample(p, drafts, draft_probs,
                                                 position_keys(e).reshape(rows, k + 1))
        sampled = (s.temperature > 0)[:, None]
        tokens = jnp.where(sampled, drawn, tokens)
        accepted = jnp.where(sampled, drawn_accepted, accepted)
    num_accepted = jnp.cumprod(accepted, axis=1).sum(axis=1).astype(jnp.int32)
    proposals = jnp.concatenate([drafts, jnp.zeros((rows, 1), drafts.dtype)], axis=1)
    tokens = jnp.where(jnp.arange(k + 1)[None, :] < num_accepted[:, None], proposals, tokens)
    out = {"tokens": tokens, "num_accepted": num_accepted}
    if want_logprobs:
        chosen, top_ids, top_lp = logprobs(logits, tokens.reshape(-1))
        out.update(logprob=chosen.reshape(rows, k + 1),
                   top_ids=top_ids.reshape(rows, k + 1, -1),
                   top_logprobs=top_lp.reshape(rows, k + 1, -1))
    return out
