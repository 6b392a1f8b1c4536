"""The chunked, tp-sharded cross-entropy equals the dense one and never builds ``[N, V]`` logits.

Runs on the real 2x4 CPU mesh (8 host devices, see conftest). Tolerances are float32:
``rtol=1e-5`` element-wise plus ``atol = 1e-6 * max|reference|`` (the gradient
``E_p[W] - W[label]`` is a difference of O(1) terms, so small entries carry absolute
float32 cancellation error of a few 1e-7). Summation order differs between the online
and the dense LSE, so bit equality is not expected, but ``pred`` must match
``jnp.argmax`` exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dflash_gptoss.train_sharded_ce import chunked_sharded_cross_entropy, dense_cross_entropy

N, H, V, CHUNK = 64, 32, 1000, 64  # 250 vocab rows per tp shard: 3 full chunks + a partial one


def _mesh(dp: int, tp: int) -> Mesh:
    devices = np.array(jax.devices()[: dp * tp]).reshape(dp, tp)
    return Mesh(devices, ("dp", "tp"))


@pytest.fixture(scope="module")
def data() -> dict[str, jax.Array]:
    k = jax.random.split(jax.random.key(0), 4)
    return {
        "hidden": jax.random.normal(k[0], (N, H), jnp.float32),
        "lm_head": 0.5 * jax.random.normal(k[1], (V, H), jnp.float32),
        "labels": jax.random.randint(k[2], (N,), 0, V, jnp.int32),
        "weights": jax.random.uniform(k[3], (N,), jnp.float32) * (jnp.arange(N) % 5 != 0),  # some rows masked
    }


def _put(mesh: Mesh, d: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
    return (
        jax.device_put(d["hidden"], NamedSharding(mesh, P("dp", None))),
        jax.device_put(d["lm_head"], NamedSharding(mesh, P("tp", None))),
        jax.device_put(d["labels"], NamedSharding(mesh, P("dp"))),
    )


def _dense_nll(hidden: jax.Array, lm_head: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(hidden @ lm_head.T, labels)


@pytest.mark.parametrize(("dp", "tp"), [(2, 4), (1, 1)])
def test_matches_dense_loss_pred_and_grad(data: dict[str, jax.Array], dp: int, tp: int) -> None:
    mesh = _mesh(dp, tp)
    hidden, lm_head, labels = _put(mesh, data)

    def loss(h: jax.Array, w: jax.Array, y: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        nll, pred = chunked_sharded_cross_entropy(h, w, y, mesh=mesh, vocab_chunk_size=CHUNK)
        return jnp.sum(nll), (nll, pred)

    (_, (nll, pred)), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(hidden, lm_head, labels)
    ref_nll = _dense_nll(data["hidden"], data["lm_head"], data["labels"])
    ref_grad = jax.grad(lambda h: jnp.sum(_dense_nll(h, data["lm_head"], data["labels"])))(data["hidden"])

    assert nll.dtype == jnp.float32 and pred.dtype == jnp.int32 and grad.dtype == jnp.float32
    np.testing.assert_allclose(nll, ref_nll, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(ref_nll))))
    np.testing.assert_array_equal(pred, jnp.argmax(data["hidden"] @ data["lm_head"].T, axis=-1))
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(ref_grad))))
    # Outputs stay row-sharded over dp.
    for out in (nll, pred):
        assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("dp")), 1)


def test_weighted_mean_gradient_matches_dense(data: dict[str, jax.Array]) -> None:
    mesh = _mesh(2, 4)
    hidden, lm_head, labels = _put(mesh, data)
    w = data["weights"]

    def chunked(h: jax.Array) -> jax.Array:
        nll, _ = chunked_sharded_cross_entropy(h, lm_head, labels, mesh=mesh, vocab_chunk_size=CHUNK)
        return jnp.sum(w * nll) / jnp.sum(w)

    def dense(h: jax.Array) -> jax.Array:
        return jnp.sum(w * _dense_nll(h, data["lm_head"], data["labels"])) / jnp.sum(w)

    val, grad = jax.jit(jax.value_and_grad(chunked))(hidden)
    ref_val, ref_grad = jax.value_and_grad(dense)(data["hidden"])
    np.testing.assert_allclose(val, ref_val, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(ref_grad))))
    masked = np.asarray(w) == 0
    assert np.all(np.asarray(grad)[masked] == 0)  # weight-0 rows get exactly zero gradient


def test_lm_head_gets_zero_gradient_and_dense_helper_agrees(data: dict[str, jax.Array]) -> None:
    """lm_head is the frozen teacher head: zero gradient by design (documented), not an error."""
    mesh = _mesh(2, 4)
    hidden, lm_head, labels = _put(mesh, data)

    def loss(w: jax.Array) -> jax.Array:
        return jnp.sum(chunked_sharded_cross_entropy(hidden, w, labels, mesh=mesh, vocab_chunk_size=CHUNK)[0])

    assert not np.any(np.asarray(jax.jit(jax.grad(loss))(lm_head)))
    ref_nll, ref_pred = dense_cross_entropy(data["hidden"], data["lm_head"], data["labels"])
    np.testing.assert_allclose(ref_nll, _dense_nll(data["hidden"], data["lm_head"], data["labels"]), rtol=1e-6)


def test_argmax_ties_pick_lowest_index_across_chunks_and_shards() -> None:
    """Equal maxima in two chunks of shard 1 and in shard 3 -> the lowest global index, like jnp.argmax."""
    mesh = _mesh(2, 4)
    u = jnp.ones((H,), jnp.float32)
    lm_head = 0.01 * jax.random.normal(jax.random.key(1), (V, H))
    for idx in (260, 330, 900):  # shard 1 chunk 0, shard 1 chunk 1, shard 3
        lm_head = lm_head.at[idx].set(u)
    hidden = jnp.ones((N, H)) + 0.001 * jax.random.normal(jax.random.key(2), (N, H))
    hidden = hidden.at[:8].set(0.0)  # all logits exactly 0 -> argmax 0
    labels = jnp.zeros((N,), jnp.int32)
    _, pred = jax.jit(lambda h, w, y: chunked_sharded_cross_entropy(h, w, y, mesh=mesh, vocab_chunk_size=CHUNK))(
        hidden, lm_head, labels
    )
    expected = jnp.argmax(hidden @ lm_head.T, axis=-1)
    np.testing.assert_array_equal(pred, expected)
    assert set(np.asarray(expected).tolist()) == {0, 260}


def test_bf16_hidden_and_chunk_larger_than_shard(data: dict[str, jax.Array]) -> None:
    """bf16 inputs are computed in float32; a chunk bigger than V/tp is clamped to the shard."""
    mesh = _mesh(2, 4)
    h16, w16 = data["hidden"].astype(jnp.bfloat16), data["lm_head"].astype(jnp.bfloat16)

    def loss(h: jax.Array) -> jax.Array:
        return jnp.sum(chunked_sharded_cross_entropy(h, w16, data["labels"], mesh=mesh, vocab_chunk_size=4096)[0])

    val, grad = jax.jit(jax.value_and_grad(loss))(h16)
    ref_val, ref_grad = jax.value_and_grad(
        lambda h: jnp.sum(_dense_nll(h.astype(jnp.float32), w16.astype(jnp.float32), data["labels"]))
    )(h16)
    assert grad.dtype == jnp.bfloat16
    np.testing.assert_allclose(val, ref_val, rtol=1e-5)
    np.testing.assert_allclose(grad.astype(jnp.float32), ref_grad.astype(jnp.bfloat16).astype(jnp.float32), rtol=1e-2)


@pytest.mark.parametrize(
    ("n", "v", "h_w", "n_labels", "chunk", "match"),
    [
        (N, 1002, H, N, CHUNK, "vocab not splittable over tp: V=1002 .* tp=4"),
        (63, V, H, 63, CHUNK, "N=63 is not divisible by dp=2"),
        (N, V, H, N, 0, "vocab_chunk_size=0 must be an int >= 1"),
        (N, V, H + 1, N, CHUNK, "hidden size mismatch"),
        (N, V, H, N - 2, CHUNK, "labels has 62 rows but hidden has 64"),
    ],
)
def test_bad_inputs_raise_clear_errors(n: int, v: int, h_w: int, n_labels: int, chunk: int, match: str) -> None:
    mesh = _mesh(2, 4)
    hidden = jnp.zeros((n, H))
    lm_head = jnp.zeros((v, h_w))
    labels = jnp.zeros((n_labels,), jnp.int32)
    with pytest.raises(ValueError, match=match):
        chunked_sharded_cross_entropy(hidden, lm_head, labels, mesh=mesh, vocab_chunk_size=chunk)


def test_bad_axis_name_and_rank() -> None:
    mesh = _mesh(2, 4)
    with pytest.raises(ValueError, match="tp_axis='model' is not a mesh axis"):
        chunked_sharded_cross_entropy(
            jnp.zeros((N, H)), jnp.zeros((V, H)), jnp.zeros((N,), jnp.int32), mesh=mesh, vocab_chunk_size=8,
            tp_axis="model",
        )
    with pytest.raises(ValueError, match=r"hidden must be \[N, H\]"):
        chunked_sharded_cross_entropy(
            jnp.zeros((2, N, H)), jnp.zeros((V, H)), jnp.zeros((N,), jnp.int32), mesh=mesh, vocab_chunk_size=8
        )


def _avals(jaxpr: jax.extend.core.Jaxpr) -> list[tuple[int, ...]]:
    """Every variable shape in a jaxpr, recursing into sub-jaxprs (shard_map, while, custom_vjp)."""
    shapes: list[tuple[int, ...]] = []
    for eqn in jaxpr.eqns:
        shapes += [tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes += _avals(inner)
    return shapes


def test_logits_never_materialised() -> None:
    """Compiled temp memory of value_and_grad is far below one [N, V] f32 array; the dense one is not."""
    n, h, v, chunk = 64, 16, 32768, 512
    mesh = _mesh(2, 4)
    k = jax.random.split(jax.random.key(3), 3)
    hidden = jax.device_put(jax.random.normal(k[0], (n, h)), NamedSharding(mesh, P("dp", None)))
    lm_head = jax.device_put(jax.random.normal(k[1], (v, h)), NamedSharding(mesh, P("tp", None)))
    labels = jax.device_put(jax.random.randint(k[2], (n,), 0, v), NamedSharding(mesh, P("dp")))

    def chunked(x: jax.Array, w: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.mean(chunked_sharded_cross_entropy(x, w, y, mesh=mesh, vocab_chunk_size=chunk)[0])

    def dense(x: jax.Array, w: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.mean(dense_cross_entropy(x, w, y)[0])

    logits_bytes = n * v * 4  # 8 MiB
    fn = jax.value_and_grad(chunked)
    chunked_stats = jax.jit(fn).lower(hidden, lm_head, labels).compile().memory_analysis()
    dense_stats = jax.jit(jax.value_and_grad(dense)).lower(*(jax.device_get(a) for a in (hidden, lm_head, labels)))
    dense_stats = dense_stats.compile().memory_analysis()
    assert dense_stats.temp_size_in_bytes >= logits_bytes  # the measurement does see [N, V] logits
    assert chunked_stats.temp_size_in_bytes < logits_bytes / 32, chunked_stats

    # And no traced array anywhere (global or per-shard) spans rows x a full vocab shard.
    shapes = _avals(jax.make_jaxpr(fn)(hidden, lm_head, labels).jaxpr)
    row_dims, vocab_dims = {n, n // 2}, {v, v // 4}
    assert not [s for s in shapes if set(s) & row_dims and set(s) & vocab_dims]
    assert any(s == (n // 2, chunk) for s in shapes)  # the per-chunk logits are there
