"""The block manager's page policy, without a model: which pages a sequence gets, which
pages the prefix cache keeps."""
from __future__ import annotations

from vllm_jax.engine.block_manager import BlockManager
from vllm_jax.engine.sequence import Sequence
from vllm_jax.sampling_params import SamplingParams

PAGE = 4


def prompt(n, first=0):
    return Sequence(list(range(first, first + n)), SamplingParams(), seed=0)


def computed(bm, seq):
    seq.num_computed_tokens = seq.num_tokens
    bm.register_computed(seq)


def test_a_prompt_gets_its_pages_in_ascending_order_after_a_sequence_freed_them():
    bm = BlockManager(8, PAGE, enable_prefix_caching=False)
    first = prompt(8 * PAGE)
    bm.allocate(first)
    bm.deallocate(first)  # freed tail first: the free list holds pages 7, 6, ..., 0
    second = prompt(6 * PAGE, first=100)
    bm.allocate(second)
    assert second.block_table == sorted(second.block_table)
    assert set(second.block_table) == {2, 3, 4, 5, 6, 7}  # still the least recently freed


def test_the_least_recently_freed_pages_are_reused_first_so_recent_prefixes_survive():
    bm = BlockManager(8, PAGE)
    old, recent = prompt(3 * PAGE), prompt(3 * PAGE, first=100)
    for seq in (old, recent):
        bm.allocate(seq)
        computed(bm, seq)
    bm.deallocate(old)
    bm.deallocate(recent)
    bm.allocate(prompt(4 * PAGE, first=500))  # the 2 spare pages, then old's
    again = prompt(3 * PAGE + 1, first=100)  # recent's prompt and one more token
    bm.allocate(again)
    assert again.num_cached_tokens == 3 * PAGE
