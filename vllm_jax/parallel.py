"""Tensor parallelism over one mesh axis, "tp", and multi-host start-up.

The sharding is written once: every model declares the logical axes of its weights
(models/base.py Weight.axes: heads, kv_heads, embed, mlp, vocab, experts, expert_mlp) and
`logical_rules` maps each logical axis to "tp" or to None (replicated). Column-parallel layers
(q/k/v/gate/up) split their out features, row-parallel layers (o/down) split their in features,
embeddings split the vocab; everything else is replicated. The step stays one jit: XLA's SPMD
partitioner inserts the collectives (an all-reduce after o_proj and after down_proj in every
layer, and gathers around the vocab-parallel embedding and lm_head).

Mixture-of-Experts layers split every expert's FFN dimension (expert_mlp), not the experts: each
device holds a slice of all experts, so its work is the same whichever experts the router picks,
and the layer needs the same one all-reduce as a dense MLP (no all-to-all).

An axis is split only when its size divides evenly, in whole heads. With fewer KV heads than
devices (GQA, e.g. 2 KV heads on 4 devices) each KV head is copied tp / num_kv_heads times at
load, in the k/v projections, so the KV heads split like the query heads: each device computes
and caches one KV head, the one its query heads read (the model's config says num_kv_heads = tp).
Where even that does not divide (e.g. 6 KV heads on 4 devices) attention is replicated whole:
q/k/v/o and the KV cache on every device, only the MLP and the embeddings split.
A packed GGUF weight splits its rows freely (every field has rows as leading dim); its columns
only on block boundaries, else that weight is replicated.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vllm_jax.kernels.quant import QTYPES, PackedWeight
from vllm_jax.models.base import ConfigError, ModelConfig, Weight

log = logging.getLogger("vllm_jax")

TP = "tp"
KV_CACHE_AXES = ("kv_heads", None, None, None)  # [num_kv_heads, num_pages, page_size, head_dim]


def kv_repeats(cfg: ModelConfig, tp: int) -> int:
    """Copies of each KV head that make the KV heads split over tp devices (1: none needed)."""
    kvh = cfg.num_kv_heads
    return tp // kvh if kvh < tp and tp % kvh == 0 and cfg.num_heads % tp == 0 else 1


def logical_rules(cfg: ModelConfig, tp: int, specs: list[Weight] = ()) -> dict:
    """Logical axis -> mesh axis: "tp" where every dim carrying it splits evenly over tp
    devices, else None. Attention splits all or nothing, in whole heads; cfg is the sharded
    model's config (after kv_repeats)."""
    def split(n):
        return TP if tp > 1 and n % tp == 0 else None

    attention = split(cfg.num_kv_heads) and split(cfg.num_heads)
    rules = {"heads": attention, "kv_heads": attention, "embed": None, "experts": None}
    sizes: dict[str, set] = {}
    for spec in specs:
        for axis, n in zip(spec.axes, spec.shape):
            sizes.setdefault(axis, set()).add(n)
    for axis, ns in sizes.items():
        if axis not in rules and axis is not None:
            rules[axis] = TP if tp > 1 and all(n % tp == 0 for n in ns) else None
    return rules


def weight_spec(axes: tuple, shape: tuple, rules: dict, tp: int, blocks: int | None = None) -> P:
    """PartitionSpec of one weight. blocks: GGUF block width of a packed weight's columns."""
    spec = [rules.get(a) if a else None for a in axes[:len(shape)]]
    for dim, size in enumerate(shape[:len(spec)]):
        unit = blocks if dim == len(shape) - 1 and blocks else 1
        if size % (unit * tp):
            spec[dim] = None
    return P(*spec)


def make_mesh(device_ids: list[int] | None = None,
              tensor_parallel_size: int | None = None) -> Mesh | None:
    """A 1-axis ("tp") mesh over the chosen devices; None for the plain single-device path.

    Without ids or a size, a multi-process run spans every device of every process.
    """
    devices = jax.devices()
    if device_ids is None and tensor_parallel_size is None:
        if jax.process_count() == 1:
            return None
        device_ids = [d.id for d in devices]
    by_id = {d.id: d for d in devices}
    if device_ids is None:
        if tensor_parallel_size > len(devices):
            raise ConfigError(f"tensor_parallel_size={tensor_parallel_size} but only "
                              f"{len(devices)} devices are visible")
        device_ids = [d.id for d in devices[:tensor_parallel_size]]
    if tensor_parallel_size is not None and tensor_parallel_size != len(device_ids):
        raise ConfigError(f"tensor_parallel_size={tensor_parallel_size} does not match "
                          f"{len(device_ids)} device ids {device_ids}")
    missing = [i for i in device_ids if i not in by_id]
    if missing:
        raise ConfigError(f"no device with id {missing[0]}; visible: "
                          f"{', '.join(str(d.id) for d in devices)} ({devices[0].platform})")
    return Mesh(np.array([by_id[i] for i in device_ids]), (TP,))


def put(x, sharding: NamedSharding) -> jax.Array:
    """A host (or device) array laid out as `sharding`; each device receives only its slice."""
    if isinstance(x, jax.Array) and sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _repeat_heads(w, num_heads: int, repeats: int):
    """Rows [num_heads * head_dim, ...] -> [num_heads * repeats * head_dim, ...], each head's
    rows repeated in place (head i becomes heads i * repeats ... i * repeats + repeats - 1)."""
    if isinstance(w, PackedWeight):
        return w._replace(fields={k: _repeat_heads(v, num_heads, repeats)
                                  for k, v in w.fields.items()})
    x = np.asarray(w)
    heads = x.reshape(num_heads, -1, *x.shape[1:])
    return np.repeat(heads, repeats, axis=0).reshape(-1, *x.shape[1:])


def shard_model(weights: dict, cfg: ModelConfig, specs: list[Weight],
                mesh: Mesh) -> tuple[ModelConfig, dict]:
    """Weight name -> array or PackedWeight (host or device), placed on the mesh by the declared
    axes and logical_rules. Returns the config the sharded weights describe (see kv_repeats)."""
    tp = mesh.shape[TP]
    repeats = kv_repeats(cfg, tp)
    cfg = dataclasses.replace(cfg, num_kv_heads=cfg.num_kv_heads * repeats)
    rules = logical_rules(cfg, tp, specs)
    out = {}
    for spec in specs:
        w = weights.get(spec.name)
        if w is None:
            continue
        if repeats > 1 and spec.axes[0] == "kv_heads":
            w = _repeat_heads(w, cfg.num_kv_heads // repeats, repeats)
        if isinstance(w, PackedWeight):
            lead = next(iter(w.fields.values())).shape[:-1]
            sharding = NamedSharding(mesh, weight_spec(spec.axes, (*lead, w.cols), rules, tp,
                                                       blocks=QTYPES[w.qtype][0]))
            out[spec.name] = w._replace(fields={k: put(v, sharding) for k, v in w.fields.items()})
        else:
            out[spec.name] = put(w, NamedSharding(mesh, weight_spec(spec.axes, w.shape, rules,
                                                                    tp)))
    return cfg, out


def kv_cache_sharding(cfg: ModelConfig, mesh: Mesh) -> NamedSharding:
    """KV heads split over "tp", or the cache replicated when the heads do not split evenly.

    Written as the step's output comes back (no trailing Nones): the donated cache then keeps
    one sharding from call to call, and the step never compiles twice for one layout.
    """
    rules = logical_rules(cfg, mesh.shape[TP])
    spec = [rules.get(a) if a else None for a in KV_CACHE_AXES]
    while spec and spec[-1] is None:
        spec.pop()
    return NamedSharding(mesh, P(*spec))


def kv_shards(cfg: ModelConfig, mesh: Mesh | None) -> int:
    """Into how many slices the KV cache splits over the mesh (1: whole on every device)."""
    if mesh is None:
        return 1
    return mesh.shape[TP] if logical_rules(cfg, mesh.shape[TP])["kv_heads"] == TP else 1


def under_mesh(fn, mesh: Mesh | None):
    """fn called (and traced) with `mesh` as the context mesh, so model code can find it."""
    if mesh is None:
        return fn

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with jax.set_mesh(mesh):
            return fn(*args, **kwargs)

    return call


def device_bytes(tree, device) -> int:
    """Bytes of the arrays in `tree` that live on `device` (its shards only)."""
    return sum(s.data.nbytes for leaf in jax.tree_util.tree_leaves(tree)
               if isinstance(leaf, jax.Array)
               for s in leaf.addressable_shards if s.device == device)


def log_device_bytes(what: str, tree, mesh: Mesh):
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    log.info("%s per device: %s", what, ", ".join(
        f"{d.id}: {device_bytes(tree, d) / 2**20:.1f} MiB" for d in local))


def shard_heads(attention_fn, num_heads: int, num_kv_heads: int, mesh: Mesh | None = None):
    """Run a per-head attention kernel (a Pallas call SPMD cannot split) on each device's heads.

    attention_fn(q [T, heads, hd], k_cache, v_cache, *metadata, **static) as in
    kernels/paged_attention.py; the head counts are the sharded model's. Under `jax.set_mesh`
    (the runner sets it) or with `mesh`, it runs in a shard_map over "tp": each device sees its
    query heads and its KV heads. Without a mesh, or with attention replicated, it returns
    attention_fn unchanged.
    """
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    if mesh.empty or TP not in mesh.axis_names:
        return attention_fn
    tp = mesh.shape[TP]
    if tp == 1 or num_heads % tp or num_kv_heads % tp:
        return attention_fn
    heads, cache = P(None, TP, None), P(TP, None, None, None)

    def sharded(q, k_cache, v_cache, *meta, **static):
        fn = jax.shard_map(lambda *a: attention_fn(*a, **static), mesh=mesh,
                           in_specs=(heads, cache, cache) + (P(),) * len(meta),
                           out_specs=heads, check_vma=False)
        return fn(q, k_cache, v_cache, *meta)

    return sharded


def split_dim(arr) -> int | None:
    """Which dim of a placed array is split over "tp" (None: replicated or not on a mesh)."""
    spec = getattr(getattr(arr, "sharding", None), "spec", ())
    return next((i for i, axis in enumerate(spec) if axis == TP), None)


def shard_qmatmul(qmatmul_fn, dim: int | None, mesh: Mesh | None = None):
    """Run a fused dequant-matmul kernel (a Pallas call SPMD cannot split) on each device's shard.

    qmatmul_fn(x [..., cols], fields, qtype, cols, **static) -> [..., rows] as kernels/quant.py
    (or quant.qmatmul_many: fields a list of dicts, one output each, every weight split alike);
    dim: split_dim of the fields, read when the layer is built. dim 0 (column-parallel): each
    device makes its rows of the output. dim 1 (row-parallel, whole blocks): each device
    multiplies its slice of x by its blocks and the partial sums are added (psum).
    """
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    if dim is None or mesh.empty or TP not in mesh.axis_names:
        return qmatmul_fn
    tp = mesh.shape[TP]

    def sharded(x, fields, qtype, cols, **static):
        lead = (None,) * (x.ndim - 1)
        field_spec = P(TP, None) if dim == 0 else P(None, TP)
        x_spec, out_spec = (P(), P(*lead, TP)) if dim == 0 else (P(*lead, TP), P())

        def local(x, fields):
            y = qmatmul_fn(x, fields, qtype, cols if dim == 0 else cols // tp, **static)
            return y if dim == 0 else jax.lax.psum(y, TP)

        return jax.shard_map(local, mesh=mesh,
                             in_specs=(x_spec, jax.tree.map(lambda _: field_spec, fields)),
                             out_specs=out_spec, check_vma=False)(x, fields)

    return sharded


def shard_grouped_qmatmul(grouped_fn, dim: int | None, mesh: Mesh | None = None):
    """shard_qmatmul for experts (fields [E, out, ...]): dim 1 splits each expert's out rows
    (gate/up), dim 2 its in columns (down: partial sums added)."""
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    if dim is None or mesh.empty or TP not in mesh.axis_names:
        return grouped_fn
    tp = mesh.shape[TP]

    def sharded(xs, fields, group_sizes, qtype, cols, **static):
        field_spec = P(None, TP, None) if dim == 1 else P(None, None, TP)
        x_spec, out_spec = (P(), P(None, TP)) if dim == 1 else (P(None, TP), P())

        def local(xs, fields, group_sizes):
            y = grouped_fn(xs, fields, group_sizes, qtype, cols if dim == 1 else cols // tp,
                           **static)
            return y if dim == 1 else jax.lax.psum(y, TP)

        return jax.shard_map(local, mesh=mesh,
                             in_specs=(x_spec, {k: field_spec for k in fields}, P()),
                             out_specs=out_spec, check_vma=False)(xs, fields, group_sizes)

    return sharded


def init_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
    """jax.distributed.initialize from arguments or VLLM_JAX_COORDINATOR / _NUM_PROCESSES /
    _PROCESS_ID. Returns False (single process) when no coordinator is given.

    Call it before anything touches a device. On the CPU the collectives go through gloo.
    """
    env = os.environ
    address = coordinator_address or env.get("VLLM_JAX_COORDINATOR")
    if not address:
        return False
    if num_processes is None and "VLLM_JAX_NUM_PROCESSES" in env:
        num_processes = int(env["VLLM_JAX_NUM_PROCESSES"])
    if process_id is None and "VLLM_JAX_PROCESS_ID" in env:
        process_id = int(env["VLLM_JAX_PROCESS_ID"])
    if num_processes is None or process_id is None:
        raise ConfigError("a multi-host run needs the number of processes and this process's id "
                          "(--num-processes/--process-id or VLLM_JAX_NUM_PROCESSES/_PROCESS_ID)")
    if not 0 <= process_id < num_processes:
        raise ConfigError(f"process id {process_id} is outside 0..{num_processes - 1}")
    if jax.distributed.is_initialized():
        return True
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=num_processes,
                               process_id=process_id)
    log.info("process %d of %d, %d devices in all (%d here)", jax.process_index(),
             jax.process_count(), jax.device_count(), jax.local_device_count())
    return True
