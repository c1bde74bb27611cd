"""Device side of speculative decoding: the target's verification step (Verifier).

A verification step is prefill-shaped: row r computes its last token and its proposals (they
sit at the end of its token_ids while the step is prepared), and its logits are read at each
of those positions. Rows propose up to k tokens; a row with fewer repeats its last logits
index and pads its proposals with -1 (never accepted). Compiled once per StepLayout, whose
`spec` is k.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from vllm_jax import parallel
from vllm_jax.engine.scheduler import ScheduledBatch
from vllm_jax.runner import rejection
from vllm_jax.runner.model_runner import (ModelRunner, StepLayout, _unpack, buckets, pick,
                                          sampling_arrays)


class Verifier:
    def __init__(self, runner: ModelRunner, k: int):
        self.runner, self.k = runner, k
        self.row_buckets = buckets(runner.seq_buckets[-1])  # T = (k + 1) x one of these
        self._verify = parallel.under_mesh(
            jax.jit(self._verify_impl, static_argnums=(6,), donate_argnums=(1,)), runner.mesh)

    def layout(self, seqs) -> StepLayout:
        """The decode layout of these rows, with room for k + 1 tokens in each: padding to the
        prefill token buckets (16 and up) would cost a 1-sequence step 16 tokens' work."""
        decode = self.runner.layout_for(ScheduledBatch(True, seqs, [1] * len(seqs)))
        rows = pick(self.row_buckets, len(seqs))
        return dataclasses.replace(decode, decode=False, spec=self.k,
                                   num_tokens=rows * (self.k + 1))

    def run(self, seqs, drafts: list[list[int]], draft_probs=None) -> dict:
        """drafts: each row's proposals, already appended to its token_ids (with pages for
        them); draft_probs [rows, k, V] or None (point masses). Returns device arrays."""
        layout = self.layout(seqs)
        counts = np.array([len(d) for d in drafts])
        batch = ScheduledBatch(False, seqs, list(1 + counts))
        ints, floats = self.runner.prepare(batch, layout)
        fields = _unpack(ints, layout.int_sizes())  # views into ints
        rows, s, k = len(seqs), layout.num_seqs, self.k
        fields["step"][:rows] -= counts  # num_output_tokens counted the proposals
        starts = np.cumsum(1 + counts) - (1 + counts)
        indices = fields["logits_indices"].reshape(s, k + 1)
        indices[:rows] = starts[:, None] + np.minimum(np.arange(k + 1)[None, :], counts[:, None])
        padded = np.full((s, k), -1, np.int32)
        for row, d in enumerate(drafts):
            padded[row, :len(d)] = d
        if draft_probs is not None:
            draft_probs = jnp.pad(draft_probs, ((0, s - rows), (0, 0), (0, 0)))
        runner = self.runner
        runner.kv, out = self._verify(runner.leaves, runner.kv, ints, floats, padded,
                                      draft_probs, layout)
        return out

    def warmup(self, draft_vocab: int | None = None) -> int:
        """Compile the verification step for every row count the engine can decode; with
        draft_vocab, sampled steps take the draft's distributions."""
        runner = self.runner
        k, empty = self.k, ScheduledBatch(True, [], [])
        layouts = {StepLayout(pick(self.row_buckets, n) * (k + 1),
                              pick(runner.seq_buckets, n), runner.max_pages, False, greedy,
                              spec=k)
                   for n in range(1, runner.seq_buckets[-1] + 1) for greedy in (True, False)}
        for layout in layouts:
            ints, floats = runner.prepare(empty, layout)
            drafts = np.full((layout.num_seqs, k), -1, np.int32)
            probs = (None if layout.greedy_only or draft_vocab is None
                     else jnp.zeros((layout.num_seqs, k, draft_vocab), jnp.float32))
            runner.kv, _ = self._verify(runner.leaves, runner.kv, ints, floats, drafts, probs,
                                        layout)
        jax.block_until_ready(runner.kv)
        return len(layouts)

    def _verify_impl(self, leaves, kv, ints, floats, drafts, draft_probs, layout: StepLayout):
        self.runner._count_compile("verify", layout)
        no_prev = jnp.zeros((self.runner.max_rows,), jnp.int32)  # nothing in flight
        kv, logits, _ = self.runner._forward_pass(leaves, kv, ints, layout, no_prev)
        params, history, num_prompt = sampling_arrays(ints, floats, layout)
        context_lens = _unpack(ints, layout.int_sizes())["context_lens"]
        num_tokens = context_lens - (drafts >= 0).sum(axis=1)
        return kv, rejection.verify(logits, params, history, num_prompt, num_tokens, drafts,
                                    draft_probs, greedy_only=layout.greedy_only,
                                    want_logprobs=layout.logprobs)
