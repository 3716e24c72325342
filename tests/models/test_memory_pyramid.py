"""memory_pyramid: the sparse memory's keys spread over the converted layers (more in the first, fewer in the last),
the total kept: the sizes, each layer's spec and decode state, the bytes counted, decode == forward under the recall
memory, save / load and set_hybrid."""

import pytest
import torch
from tiny_models import assert_decode_bytes_are_the_cache, assert_decode_equals_forward, converted_off_init

import linearize
from linearize.config import HybridConfig
from linearize.models.convert import hybrid_modules


@pytest.mark.parametrize("p,layers,m", [(7, list(range(28)), 2048), (3, [1, 4, 6, 9], 3), (2, [0, 5], 10),
                                        (1.5, list(range(5)), 1), (1, [2, 3], 7)])
def test_sizes_fall_layer_by_layer_and_keep_the_total(p, layers, m):
    sizes = HybridConfig(sparse_memory=m, memory_pyramid=p, layers=layers).memory_sizes(layers)
    assert list(sizes) == sorted(layers) and sum(sizes.values()) == m * len(layers)
    values = list(sizes.values())
    assert values == sorted(values, reverse=True) and min(values) >= 1
    if p == 1:
        assert set(values) == {m}


def test_the_ramp_runs_from_p_to_1():
    """Weights p .. 1, mean (p + 1) / 2: the first layer keeps 2p / (p + 1) of m, the last 2 / (p + 1)."""
    sizes = list(HybridConfig(sparse_memory=2048, memory_pyramid=7, layers=list(range(28))).memory_sizes(range(28)).values())
    assert sizes[0] == 3584 and sizes[-1] == 512


@pytest.mark.parametrize("settings", [dict(sparse_memory=4, memory_pyramid=0.5), dict(memory_pyramid=2.0)])
def test_a_pyramid_below_1_or_without_a_memory_is_refused(settings):
    with pytest.raises(ValueError, match="memory_pyramid"):
        HybridConfig(**settings)


def test_a_layers_share_needs_the_converted_layers():
    assert HybridConfig(sparse_memory=4).layer_memory(3) == 4  # no pyramid: the same everywhere
    with pytest.raises(ValueError, match="list"):
        HybridConfig(sparse_memory=4, memory_pyramid=2.0).layer_memory(0)  # layers 'all': not resolved yet
    with pytest.raises(ValueError, match="not in"):
        HybridConfig(sparse_memory=4, memory_pyramid=2.0, layers=[0, 1]).layer_memory(5)


def pyramid_model(select: str):
    extra = dict(memory_observe=4, memory_pool=3, memory_reread=1) if select == "query" else dict(memory_block=4)
    return converted_off_init("llama", HybridConfig(window=4, sparse_memory=4, memory_pyramid=3, memory_select=select,
                                                    softmax_sinks=1, combine="mix", linear_state="delta",
                                                    decay_init=0.8, **extra))


@pytest.mark.parametrize("select", ["query", "recall"])
def test_each_layer_holds_its_share_and_the_bytes_counted_are_the_cache(select):
    """Two layers, m = 4, p = 3: 6 keys in the first, 2 in the second, in the spec and in the decode state; the bytes
    `decode_state_bytes` counts are those the cache holds."""
    model = pyramid_model(select)
    assert [layer.spec.sparse_memory for layer in hybrid_modules(model)] == [6, 2]
    cache = assert_decode_bytes_are_the_cache(model, 40)
    assert [layer.state.memory.k.shape[2] for layer in cache.layers] == [6, 2]


def test_the_recall_memory_decodes_as_the_full_forward():
    torch.manual_seed(0)
    assert_decode_equals_forward(pyramid_model("recall"), "hybrid", torch.randint(1, 128, (1, 40)), prompt=13)


def test_set_hybrid_spreads_the_memory_and_save_load_keeps_it(tmp_path):
    model = converted_off_init("llama", HybridConfig(window=4, sparse_memory=4, memory_select="query", memory_observe=4,
                                                    memory_reread=1, combine="mix"))
    ids = torch.randint(1, 128, (1, 30))
    uniform = model.generate(ids, max_new_tokens=8, do_sample=False)
    linearize.set_hybrid(model, memory_pyramid=3.0)
    assert [layer.spec.sparse_memory for layer in hybrid_modules(model)] == [6, 2]
    model.save_pretrained(tmp_path)
    loaded = linearize.load(tmp_path)
    assert [layer.spec.sparse_memory for layer in hybrid_modules(loaded)] == [6, 2]
    spread = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(spread, loaded.generate(ids, max_new_tokens=8, do_sample=False))
    linearize.set_hybrid(model, memory_pyramid=1.0)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), uniform)
