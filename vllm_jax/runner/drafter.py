"""A draft model proposing tokens for speculative decoding, on its own ModelRunner and KV cache.

The draft cache has the target's page count and page size, so each sequence's block table
addresses both. Per sequence the drafter remembers how many of its tokens the draft cache
holds (valid while the sequence keeps the same block table list: releasing its pages replaces
the list); each round first computes the rest (the tokens accepted since), then runs k steps
that each feed the previous proposal. Positions a row may not propose at write nowhere.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from vllm_jax import parallel
from vllm_jax.config import ConfigError
from vllm_jax.engine.scheduler import ScheduledBatch
from vllm_jax.runner import rejection
from vllm_jax.runner.model_runner import ModelRunner, StepLayout, _unpack, sampling_arrays
from vllm_jax.runner.sampler import argmax, constrain, filter_logits

DRAFT_STREAM = 3  # the draft's draws use their own fold of each position's key


class DraftView:
    """A sequence as the draft model sees it: its tokens and the proposals so far, and how many
    of them the draft cache holds."""

    def __init__(self, seq, num_computed_tokens: int):
        self.seq = seq
        self.token_ids = list(seq.token_ids)
        self.num_computed_tokens = num_computed_tokens
        self.params, self.seed = seq.params, seq.seed
        self.num_prompt_tokens, self.block_table = seq.num_prompt_tokens, seq.block_table

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    num_known_tokens = num_tokens  # no token of a speculative step is in flight
    prev_row = -1

    def block_array(self):
        return self.seq.block_array()


class Drafter:
    def __init__(self, loaded, target: ModelRunner, max_num_seqs: int, k: int):
        cfg, target_cfg = loaded.config, target.cfg
        if cfg.vocab_size != target_cfg.vocab_size:
            raise ConfigError(f"the draft model's vocabulary ({cfg.vocab_size}) is not the "
                              f"target's ({target_cfg.vocab_size})")
        if cfg.max_position_embeddings < target.max_model_len:
            raise ConfigError(f"the draft model's context ({cfg.max_position_embeddings}) is "
                              f"shorter than max_model_len {target.max_model_len}")
        self.runner = ModelRunner(loaded.model, target.eos_ids, target.num_pages,
                                  target.page_size, target.max_model_len, max_num_seqs,
                                  target.token_buckets[-1], target.prefill_seq_buckets[-1],
                                  target.kv_dtype, mesh=target.mesh)
        self.k = k
        self.computed: dict[int, tuple[list, int]] = {}  # seq_id -> (block_table, tokens)
        self._proposed: dict[int, tuple[int, int]] = {}  # seq_id -> (num_tokens, proposals)
        self._draft = parallel.under_mesh(
            jax.jit(self._draft_impl, static_argnums=(4,), donate_argnums=(1,)), target.mesh)

    def propose(self, seqs, room: list[int]):
        """-> (proposals per row, their distributions [rows, k, V] on the device or None when
        every row is greedy)."""
        self.computed = {s.seq_id: self.computed[s.seq_id] for s in seqs
                         if s.seq_id in self.computed}
        views = [DraftView(s, self._num_computed(s)) for s in seqs]
        self._catch_up(views)
        probs, proposals = [], [[] for _ in seqs]
        for i in range(max(room)):  # step 0 feeds each row's last token, step i proposal i - 1
            tokens, q = self._step(views, [0 < i >= n for n in room])
            probs.append(q)
            tokens = np.asarray(tokens)
            for row, view in enumerate(views):
                if i < room[row]:
                    proposals[row].append(int(tokens[row]))
                if i + 1 < room[row]:  # the next step feeds it; idle rows stay in their pages
                    view.num_computed_tokens = view.num_tokens
                    view.token_ids.append(int(tokens[row]))
        for seq, n in zip(seqs, room):
            self._proposed[seq.seq_id] = (seq.num_tokens, n)
            self.computed[seq.seq_id] = (seq.block_table, seq.num_tokens)
        if probs[0] is None:
            return proposals, None
        q = jnp.stack([p[:len(seqs)] for p in probs], axis=1)
        return proposals, jnp.pad(q, ((0, 0), (0, self.k - q.shape[1]), (0, 0)))

    def commit(self, seq, num_accepted: int):
        """The draft cache holds the last token and the accepted proposals but the final one
        (whose KV no draft step computed)."""
        num_tokens, n = self._proposed.pop(seq.seq_id)
        if seq.block_table is self.computed[seq.seq_id][0]:
            self.computed[seq.seq_id] = (seq.block_table, num_tokens + min(num_accepted, max(n - 1, 0)))

    def _num_computed(self, seq) -> int:
        table, n = self.computed.get(seq.seq_id, (None, 0))
        return n if table is seq.block_table else 0

    def _catch_up(self, views):
        """Compute all but each row's last token, in steps of at most the token budget."""
        budget = self.runner.token_buckets[-1]
        while any(v.num_computed_tokens < v.num_tokens - 1 for v in views):
            rows, counts, left = [], [], budget
            for v in views:
                n = min(v.num_tokens - 1 - v.num_computed_tokens, left)
                if n > 0 and len(rows) < self.runner.prefill_seq_buckets[-1]:
                    rows.append(v)
                    counts.append(n)
                    left -= n
            self.runner.run(ScheduledBatch(False, rows, counts))
            for v, n in zip(rows, counts):
                v.num_computed_tokens += n

    def _step(self, views: list[DraftView], idle: list[bool]):
        """One decode step of the draft; rows marked idle write no KV. -> (tokens, q) on the
        device."""
        runner = self.runner
        batch = ScheduledBatch(True, views, [1] * len(views))
        layout = dataclasses.replace(runner.layout_for(batch), logprobs=False)
        ints, floats = runner.prepare(batch, layout)
        slots = _unpack(ints, layout.int_sizes())["slot_mapping"]
        slots[:len(idle)][np.array(idle)] = runner.num_pages * runner.page_size
        runner.kv, tokens, q = self._draft(runner.leaves, runner.kv, ints, floats, layout)
        return tokens, q

    def warmup(self) -> int:
        """Compile the draft's steps: its runner's, and a draft step per row bucket."""
        runner = self.runner
        count = runner.warmup()
        empty = ScheduledBatch(True, [], [])
        for s in runner.seq_buckets:
            for greedy in (True, False):
                layout = StepLayout(s, s, runner.max_pages, True, greedy)
                ints, floats = runner.prepare(empty, layout)
                runner.kv, _, _ = self._draft(runner.leaves, runner.kv, ints, floats, layout)
                count += 1
        jax.block_until_ready(runner.kv)
        return count

    def _draft_impl(self, leaves, kv, ints, floats, layout: StepLayout):
        self.runner._count_compile("draft", layout)
        no_prev = jnp.zeros((self.runner.max_rows,), jnp.int32)  # nothing in flight
        kv, logits, _ = self.runner._forward_pass(leaves, kv, ints, layout, no_prev)
        params, history, num_prompt = sampling_arrays(ints, floats, layout)
        constrained = constrain(logits, params, history, num_prompt)
        greedy = argmax(constrained)
        if layout.greedy_only:
            return kv, greedy, None
        q = jax.nn.softmax(filter_logits(constrained, params), axis=-1)
        keys = jax.vmap(lambda key: jax.random.fold_in(key, DRAFT_STREAM))(
            rejection.position_keys(params))
        gumbel = jax.vmap(lambda key: jax.random.gumbel(key, q.shape[1:]))(keys)
        drawn = argmax(jnp.log(q) + gumbel)
        return kv, jnp.where(params.temperature > 0, drawn, greedy), q
