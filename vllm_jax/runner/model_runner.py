"""Runs a ScheduledBatch on the device: pad to a bucket, one transfer in, one jitted step, read back.

The step is compiled once per StepLayout (bucket sizes and a few static flags). A step with
constrained rows (structured output) runs as two programs compiled per layout, the forward then
the sampling, so the host fills the allowed-token bitmask while the forward runs. Weights travel
as an argument and the KV cache is donated, so it is updated in place. Both go in as flat lists
of arrays, which jit's C++ dispatch reads directly: handing it the NNX state (and the graphdef as
a static argument) cost ~8 ms of Python hashing and flattening per step.

Under async scheduling a decode row's input token may not be known on the host yet: its
`prev_row` names the row of the previous step's sampled tokens (a device array every step takes,
[max rows], and every step returns) that the step reads it from, so no step waits for a readback.

A pure decode batch may run several steps in one program (StepLayout.steps: a loop on the
device, each step sampling the next one's input): the executable takes every weight buffer per
call (~750 on the default model, ~1.3 ms of the host's time on a 2-core VM), which such a run
pays once for all its steps.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from vllm_jax import parallel
from vllm_jax.kernels import lowering
from vllm_jax.engine.scheduler import ScheduledBatch
from vllm_jax.models.layers import PAD_TOKEN, AttnMetadata
from vllm_jax.runner.sampler import MAX_LOGPROBS, SamplingArrays, sample

log = logging.getLogger("vllm_jax")

INT_FIELDS = ("tokens:T", "prev_row:T", "positions:T", "slot_mapping:T", "seq_idx:T",
              "block_tables:SB", "context_lens:S", "logits_indices:L", "top_k:S", "seed:S",
              "step:S", "min_tokens:S", "banned:SX")
MIN_BANNED = 8  # eos and stop_token_ids masked below min_tokens: the width's smallest bucket
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence", "frequency", "repetition")
SAMPLING_ATTRS = dict(zip(FLOAT_FIELDS, ("temperature", "top_p", "min_p", "presence_penalty",
                                         "frequency_penalty", "repetition_penalty")))


def kv_cache_shape(cfg, num_pages: int, page_size: int) -> tuple:
    """One layer's K (or V): [num_kv_heads, num_pages, page_size, head_dim]."""
    return (cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)


def kv_cache_bytes_per_page(cfg, page_size: int, itemsize: int) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * page_size * cfg.head_dim * itemsize


def enable_compilation_cache(root):
    """Keep every compiled step function on disk so the next start loads instead of compiling."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(root / "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class CompileClock:
    """Seconds this process spent tracing, compiling and loading compiled programs (from JAX's
    monitoring events), so throughput figures can leave them out."""
    seconds = 0.0
    _listening = False

    @classmethod
    def start(cls):
        if not cls._listening:
            jax.monitoring.register_event_duration_secs_listener(cls._record)
            cls._listening = True

    @classmethod
    def _record(cls, event: str, duration: float, **_):
        if event.startswith("/jax/core/compile/"):  # tracing, lowering, compiling or loading
            cls.seconds += duration


def buckets(limit: int, start: int = 1) -> list[int]:
    """Powers of two from `start`, ending exactly at `limit`."""
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


def pick(bucket_list: list[int], n: int) -> int:
    return next(b for b in bucket_list if b >= n)


@dataclass(frozen=True)
class StepLayout:
    num_tokens: int  # T
    num_seqs: int  # S
    max_pages: int  # B
    decode: bool
    greedy_only: bool = False
    logprobs: bool = False
    penalties: int = 0  # history length when any row uses penalties, else 0
    banned: int = MIN_BANNED  # ids banned per row below min_tokens (a power of two from 8)
    prompt_logprobs: bool = False
    spec: int = 0  # speculative verification: logits at spec + 1 positions of every row
    steps: int = 1  # decode steps in one dispatch, each row's sampled token its next input

    def int_sizes(self):
        n = {"T": self.num_tokens, "S": self.num_seqs, "SB": self.num_seqs * self.max_pages,
             "L": self.num_seqs * (self.spec + 1),
             "SX": self.num_seqs * self.banned}
        sizes = [(f.split(":")[0], n[f.split(":")[1]]) for f in INT_FIELDS]
        if self.penalties:
            sizes += [("history", self.num_seqs * self.penalties), ("num_prompt", self.num_seqs)]
        if self.prompt_logprobs:
            sizes.append(("targets", self.num_tokens))
        return sizes


def _unpack(flat, sizes):
    out, off = {}, 0
    for name, size in sizes:
        out[name] = flat[off:off + size]
        off += size
    return out


def sampling_arrays(ints, floats, layout: StepLayout):
    """-> (SamplingArrays, history [S, penalties] or None, num_prompt [S] or None)."""
    i = _unpack(ints, layout.int_sizes())
    f = _unpack(floats, [(n, layout.num_seqs) for n in FLOAT_FIELDS])
    s = layout.num_seqs
    params = SamplingArrays(f["temperature"], i["top_k"], f["top_p"], f["min_p"],
                            f["presence"], f["frequency"], f["repetition"], i["seed"],
                            i["step"], i["min_tokens"], i["banned"].reshape(s, layout.banned))
    history = i["history"].reshape(s, layout.penalties) if layout.penalties else None
    return params, history, i.get("num_prompt")


def _input_tokens(i: dict, prev_tokens):
    """[T]: each token's id, gathered from prev_tokens where its prev_row is set."""
    prev = i["prev_row"]  # [T]: -1, or the row of prev_tokens that holds this token
    return jnp.where(prev >= 0, prev_tokens[jnp.maximum(prev, 0)], i["tokens"])


class ModelRunner:
    def __init__(self, model: nnx.Module, eos_ids: list[int], num_pages: int, page_size: int, max_model_len: int,
                 max_num_seqs: int, max_num_batched_tokens: int, max_prefill_step_seqs: int,
                 kv_dtype, mesh=None):
        self.cfg = model.cfg
        self.eos_ids = list(eos_ids)
        self.graphdef, self.state = nnx.split(model)
        self.leaves, self._treedef = jax.tree.flatten(self.state)
        self.page_size = page_size
        self.num_pages = num_pages
        self.max_pages = -(-max_model_len // page_size)
        self.max_model_len = max_model_len
        self.seq_buckets = buckets(max_num_seqs)
        self.token_buckets = buckets(max_num_batched_tokens, start=min(16, max_num_batched_tokens))
        # rows of a prefill-shaped step: prompt chunks, and in a mixed step decode rows too
        self.prefill_seq_buckets = buckets(max_prefill_step_seqs)
        self.max_rows = max(self.seq_buckets[-1], self.prefill_seq_buckets[-1])
        self.kv_dtype, self.mesh = kv_dtype, mesh
        self.reset_kv()
        if mesh is not None:
            parallel.log_device_bytes("KV cache", self.kv, mesh)
        self.num_compiles = 0
        self.decode_steps = 1  # the most decode steps a dispatch runs (the engine sets it)
        self.no_prev_tokens = self._replicated(np.zeros(self.max_rows, np.int32))
        self._step = parallel.under_mesh(
            jax.jit(self._step_impl, static_argnums=(4,), donate_argnums=(1,)), mesh)
        self._forward = parallel.under_mesh(
            jax.jit(self._forward_impl, static_argnums=(3,), donate_argnums=(1,)), mesh)
        self._sample = parallel.under_mesh(jax.jit(self._sample_impl, static_argnums=(4,)), mesh)

    def reset_kv(self):
        """A zeroed KV cache (at start, and after a failed step: the old one was donated)."""
        self.kv = None  # the old cache's memory goes before the new one is allocated
        shape = kv_cache_shape(self.cfg, self.num_pages, self.page_size)
        where = None if self.mesh is None else parallel.kv_cache_sharding(self.cfg, self.mesh)
        self.kv = [jnp.zeros(shape, self.kv_dtype, device=where)  # K, V of layer 0, of layer 1...
                   for _ in range(2 * self.cfg.num_layers)]

    def _replicated(self, host: np.ndarray) -> jax.Array:
        """On every device of the mesh, as the step returns its sampled tokens (one sharding
        from call to call, so the step never compiles twice for one layout)."""
        if self.mesh is None:
            return jnp.asarray(host)
        return jax.device_put(host, NamedSharding(self.mesh, PartitionSpec()))

    def model(self, leaves=None) -> nnx.Module:
        """The model over `leaves` (default: the weights held here); usable inside a jit."""
        state = jax.tree.unflatten(self._treedef, self.leaves if leaves is None else leaves)
        return nnx.merge(self.graphdef, state)

    # -- device side --------------------------------------------------------------------------
    def _step_impl(self, leaves, kv, ints, floats, layout: StepLayout, prev_tokens):
        self._count_compile("step", layout)
        if layout.steps > 1:
            return self._decode_run(leaves, kv, ints, floats, layout, prev_tokens)
        kv, logits, out = self._forward_pass(leaves, kv, ints, layout, prev_tokens)
        return kv, {**out, **self._sampling(logits, ints, floats, None, layout)}

    def _forward_impl(self, leaves, kv, ints, layout: StepLayout, prev_tokens):
        self._count_compile("forward", layout)
        return self._forward_pass(leaves, kv, ints, layout, prev_tokens)

    def _sample_impl(self, logits, ints, floats, bitmask, layout: StepLayout):
        self._count_compile("sampling", layout)
        return self._sampling(logits, ints, floats, bitmask, layout)

    def _count_compile(self, what: str, layout: StepLayout):
        self.num_compiles += 1  # runs only while tracing, i.e. once per compile
        log.debug("compiling %s %s", what, layout)

    def _forward_pass(self, leaves, kv, ints, layout: StepLayout, prev_tokens):
        """-> (the updated KV cache, logits [S, V] of each row's last token, prompt logprobs)."""
        model = self.model(leaves)
        kv = list(zip(kv[0::2], kv[1::2]))
        i = _unpack(ints, layout.int_sizes())
        s, b = layout.num_seqs, layout.max_pages
        meta = AttnMetadata(i["positions"], i["slot_mapping"], i["seq_idx"],
                            i["block_tables"].reshape(s, b), i["context_lens"])
        hidden, kv = model(_input_tokens(i, prev_tokens), kv, meta, layout.decode)
        logits = model.logits(hidden[i["logits_indices"]])
        out = {}
        if layout.prompt_logprobs:
            all_lp = jax.nn.log_softmax(model.logits(hidden), axis=-1)
            out["prompt_logprob"] = jnp.take_along_axis(all_lp, i["targets"][:, None], -1)[:, 0]
            out["prompt_top_logprobs"], out["prompt_top_ids"] = jax.lax.top_k(all_lp, MAX_LOGPROBS)
        return [c for pair in kv for c in pair], logits, out

    def _decode_run(self, leaves, kv, ints, floats, layout: StepLayout, prev_tokens):
        """layout.steps decode steps in one program (a loop on the device): step k computes
        each row's token at its position + k, the token step k - 1 sampled, and samples with
        the step index + k, so the tokens are those of layout.steps single steps. -> (the KV
        cache, {"tokens": the last step's [max rows], "sampled": [steps, S]})."""
        model = self.model(leaves)
        i = _unpack(ints, layout.int_sizes())
        s, ps = layout.num_seqs, self.page_size
        tables = i["block_tables"].reshape(s, layout.max_pages)
        live = i["context_lens"] > 0  # padding rows write nowhere, read nothing
        params, _, _ = sampling_arrays(ints, floats, layout)

        def step(k, carry):
            kv, tokens, sampled = carry
            pos = i["positions"] + k
            slots = jnp.where(live, tables[jnp.arange(s), pos // ps] * ps + pos % ps,
                              self.num_pages * ps)
            meta = AttnMetadata(pos, slots, i["seq_idx"], tables,
                                jnp.where(live, i["context_lens"] + k, 0))
            hidden, kv = model(jnp.where(live, tokens, PAD_TOKEN), kv, meta, True)
            tokens, *_ = sample(model.logits(hidden), params._replace(step=params.step + k),
                                greedy_only=layout.greedy_only, want_logprobs=False)
            return kv, tokens, sampled.at[k].set(tokens)

        kv = list(zip(kv[0::2], kv[1::2]))
        sampled = jnp.zeros((layout.steps, s), jnp.int32)
        kv, tokens, sampled = jax.lax.fori_loop(
            0, layout.steps, step, (kv, _input_tokens(i, prev_tokens), sampled))
        return [c for pair in kv for c in pair], {
            "tokens": jnp.pad(tokens, (0, self.max_rows - s)), "sampled": sampled}

    def _sampling(self, logits, ints, floats, bitmask, layout: StepLayout) -> dict:
        params, history, num_prompt = sampling_arrays(ints, floats, layout)
        tokens, lp, top_ids, top_lp = sample(
            logits, params, greedy_only=layout.greedy_only, want_logprobs=layout.logprobs,
            history=history, num_prompt=num_prompt, bitmask=bitmask)
        out = {"tokens": jnp.pad(tokens, (0, self.max_rows - layout.num_seqs))}  # [max rows]: prev_tokens
        if layout.logprobs:
            out.update(logprob=lp, top_ids=top_ids, top_logprobs=top_lp)
        return out

    def export_step(self, layout: StepLayout):
        """The step at `layout` exported for CUDA from shapes alone (kernels/lowering.py): the
        weights may be jax.ShapeDtypeStructs."""
        ints = jax.ShapeDtypeStruct((sum(n for _, n in layout.int_sizes()),), jnp.int32)
        floats = jax.ShapeDtypeStruct((len(FLOAT_FIELDS) * layout.num_seqs,), jnp.float32)
        kv = [jax.ShapeDtypeStruct(c.shape, c.dtype) for c in self.kv]
        prev = jax.ShapeDtypeStruct((self.max_rows,), jnp.int32)
        step = jax.jit(self._step_impl, static_argnums=(4,))
        return lowering.export_for_cuda(step, self.leaves, kv, ints, floats, layout, prev)

    # -- host side ----------------------------------------------------------------------------
    def layout_for(self, batch: ScheduledBatch) -> StepLayout:
        seqs = batch.seqs
        if batch.decode:
            t = s = pick(self.seq_buckets, len(seqs))
        else:
            t = pick(self.token_buckets, batch.num_tokens)
            s = pick(self.prefill_seq_buckets, len(seqs))
        p = [q.params for q in seqs]
        penalties = self.max_model_len if any(x.uses_penalties for x in p) else 0
        banned = max((len(self._banned(x)) for x in p if x.min_tokens), default=0)
        return StepLayout(banned=max(MIN_BANNED, 1 << (banned - 1).bit_length()),
            num_tokens=t, num_seqs=s, max_pages=self.max_pages, decode=batch.decode,
            steps=batch.num_steps,
            greedy_only=batch.decode and all(x.greedy for x in p),
            logprobs=any(x.logprobs is not None for x in p), penalties=penalties,
            prompt_logprobs=not batch.decode and any(
                x.prompt_logprobs is not None and q.num_computed_tokens < q.num_prompt_tokens
                for x, q in zip(p, seqs)))

    def _banned(self, sp) -> list[int]:
        return ([] if sp.ignore_eos else self.eos_ids) + sp.stop_token_ids

    def prepare(self, batch: ScheduledBatch, layout: StepLayout):
        s, b = layout.num_seqs, layout.max_pages
        oob = self.num_pages * self.page_size
        a = {name: np.zeros(size, np.int32) for name, size in layout.int_sizes()}
        a["slot_mapping"][:] = oob
        a["tokens"][:] = PAD_TOKEN
        a["prev_row"][:] = -1
        a["seq_idx"][:] = s - 1
        a["banned"][:] = -1
        banned = a["banned"].reshape(s, layout.banned)
        tables = a["block_tables"].reshape(s, b)
        fl = {n: np.zeros(s, np.float32) for n in FLOAT_FIELDS}
        fl["top_p"][:] = 1.0
        fl["repetition"][:] = 1.0
        if layout.penalties:
            a["history"][:] = -1
            history = a["history"].reshape(s, layout.penalties)
        self._fill_tokens(batch, layout, a, tables)
        self._fill_sampling(batch.seqs, a, fl, banned)
        if layout.penalties:
            for row, seq in enumerate(batch.seqs):
                history[row, :seq.num_tokens] = seq.token_ids
                a["num_prompt"][row] = seq.num_prompt_tokens
        ints = np.concatenate([a[name] for name, _ in layout.int_sizes()])
        floats = np.concatenate([fl[n] for n in FLOAT_FIELDS])
        return ints, floats

    def _fill_tokens(self, batch: ScheduledBatch, layout: StepLayout, a: dict, tables):
        """Per token: id, position, cache slot, row; per row: its pages and where it ends."""
        for row, seq in enumerate(batch.seqs):
            table = seq.block_array()
            tables[row, :len(table)] = table
        if all(n == 1 for n in batch.num_new_tokens) and not layout.prompt_logprobs:
            self._fill_one_token_rows(batch.seqs, a)
        else:
            self._fill_chunks(batch, layout, a)
        ends = np.cumsum(batch.num_new_tokens, dtype=np.int64)
        rows = len(batch.seqs)
        a["logits_indices"][:rows] = ends - 1
        a["context_lens"][:rows] = [q.num_computed_tokens + n
                                    for q, n in zip(batch.seqs, batch.num_new_tokens)]

    def _fill_one_token_rows(self, seqs: list, a: dict):
        """Every row computes one token (decode): fill each field as one column."""
        rows, ps = len(seqs), self.page_size
        pos = [q.num_computed_tokens for q in seqs]
        a["tokens"][:rows] = [q.token_ids[p] for q, p in zip(seqs, pos)]
        a["prev_row"][:rows] = [q.prev_row for q in seqs]
        a["positions"][:rows] = pos
        a["slot_mapping"][:rows] = [q.block_table[p // ps] * ps + p % ps for q, p in zip(seqs, pos)]
        a["seq_idx"][:rows] = np.arange(rows)

    def _fill_chunks(self, batch: ScheduledBatch, layout: StepLayout, a: dict):
        off = 0
        for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            pos = np.arange(start, start + n)
            table = seq.block_array()
            a["tokens"][off:off + n] = seq.token_ids[start:start + n]
            a["positions"][off:off + n] = pos
            a["slot_mapping"][off:off + n] = table[pos // self.page_size] * self.page_size + (
                pos % self.page_size)
            a["seq_idx"][off:off + n] = row
            if start + n > seq.num_known_tokens:  # its last token is still in flight
                a["prev_row"][off + n - 1] = seq.prev_row
            if layout.prompt_logprobs:
                tgt = seq.token_ids[start + 1:start + n + 1]
                a["targets"][off:off + len(tgt)] = tgt
            off += n

    def _fill_sampling(self, seqs: list, a: dict, fl: dict, banned):
        """Each row's sampling parameters, one column at a time."""
        rows, p = len(seqs), [q.params for q in seqs]
        a["top_k"][:rows] = [x.top_k for x in p]
        a["seed"][:rows] = np.array([q.seed for q in seqs], np.int64).astype(np.uint32).view(np.int32)
        a["step"][:rows] = [q.num_output_tokens for q in seqs]
        a["min_tokens"][:rows] = [x.min_tokens for x in p]
        for row, sp in enumerate(p):
            if sp.min_tokens:
                ban = self._banned(sp)
                banned[row, :len(ban)] = ban
        for name, attr in SAMPLING_ATTRS.items():
            fl[name][:rows] = [getattr(x, attr) for x in p]

    def run(self, batch: ScheduledBatch, bitmask: Callable[[], np.ndarray] | None = None,
            prev_tokens: jax.Array | None = None) -> dict:
        """Dispatch the step; returns device arrays (read them with jax.device_get).
        `bitmask`, when some row is constrained, is called while the forward runs: it returns
        [len(batch.seqs), words] int32, the tokens each row may sample (bit t % 32 of word
        t // 32, all bits set for a free row). `prev_tokens`: the "tokens" of the step in
        flight, where the rows holding a placeholder read their input."""
        layout = self.layout_for(batch)
        ints, floats = self.prepare(batch, layout)
        prev = self.no_prev_tokens if prev_tokens is None else prev_tokens
        if bitmask is None:
            self.kv, out = self._step(self.leaves, self.kv, ints, floats, layout, prev)
            return out
        self.kv, logits, out = self._forward(self.leaves, self.kv, ints, layout, prev)
        rows = bitmask()
        padded = np.full((layout.num_seqs, rows.shape[1]), -1, np.int32)
        padded[:len(rows)] = rows
        return {**out, **self._sample(logits, ints, floats, padded, layout)}

    def warmup(self, prefill: bool = True) -> int:
        """Compile the decode buckets (greedy and sampled) and, with `prefill`, every
        prefill-shaped bucket too (prompt chunks, mixed steps); returns how many. A bucket not
        compiled here compiles on its first step."""
        seqs = self.prefill_seq_buckets
        layouts = [StepLayout(s, s, self.max_pages, True, greedy, steps=k)
                   for s in self.seq_buckets for greedy in (True, False)
                   for k in sorted({1, self.decode_steps})]
        if prefill:  # a step has at most t sequences
            layouts += [StepLayout(t, s, self.max_pages, False) for t in self.token_buckets
                        for s in seqs if s <= pick(seqs, min(t, seqs[-1]))]
        empty = ScheduledBatch(False, [], [])
        for layout in layouts:
            ints, floats = self.prepare(empty, layout)
            self.kv, out = self._step(self.leaves, self.kv, ints, floats, layout,
                                      self.no_prev_tokens)
        jax.block_until_ready(self.kv)
        return len(layouts)
