"""Exact full-vocab cross-entropy over a ``dp`` x ``tp`` mesh without ``[N, V]`` logits.

The draft is trained against the teacher's ``lm_head`` (``[V, H]``, V = 201088 for
gpt-oss). Materialising ``[N, V]`` float32 logits (plus their gradient) costs gigabytes
per step, so this module computes the *exact* softmax cross-entropy chunk by chunk:

* ``lm_head`` rows are sharded over ``tp``; each shard walks its ``V / tp`` rows in
  chunks of ``vocab_chunk_size`` with an online log-sum-exp (running max and rescaled
  running sum-exp), picks up the target logit when the label falls in the chunk, and
  keeps a running argmax. Only ``[N / dp, chunk]`` logits exist at any time.
* Shards are combined over ``tp``: global max (``pmax``; the loss is differentiated
  through a ``custom_vjp`` so ``pmax``'s lack of a derivative never matters, and the
  max is additionally under ``stop_gradient``), rescaled sum-exp (``psum``), target
  logit (``psum``), argmax (highest value, ties -> lowest vocab index like
  ``jnp.argmax``).

Gradient. ``d nll_i / d h_i = E_{p_i}[W] - W[label_i]``, where ``p_i`` is the softmax
of row i. The *differentiated* forward (``custom_vjp`` fwd rule) accumulates the
un-normalised ``sum_v exp(l_v - m) W_v`` alongside the sum-exp (rescaled in step with
it), so after the pass it holds ``E_p[W]`` as an ``[N, H]`` residual. The backward
rule is then just ``g[:, None] * residual``: one extra ``[N, chunk] @ [chunk, H]``
matmul per chunk in the forward and no second sweep over the vocabulary, which
matches the dense loss's two matmuls (logits, then ``dlogits @ W``). Memory is
``O(N * (chunk + H))`` per device and never ``O(N * V)``. The undifferentiated call
(eval, ``pred`` only) skips the accumulator.

``lm_head`` is the frozen teacher head: it is treated as a constant (as if under
``stop_gradient``) and its gradient is **zero by design**. Computing it would need a
``[V, H]`` accumulator per step that training never uses.

Last chunk. When a shard's vocab size is not a multiple of the chunk, the last chunk
is *clamped* to end at the shard's last row (it overlaps the previous chunk) and the
overlapping rows are masked to ``-inf``: same result as padding the last chunk with
``-inf`` rows, but without copying the ``[V / tp, H]`` weight shard into a padded
buffer (1.1 GB for gpt-oss in bf16 at tp=1).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from dflash_gptoss.mesh import DP, TP

__all__ = ["chunked_sharded_cross_entropy", "dense_cross_entropy"]


def _check_inputs(
    hidden: jax.Array,
    lm_head: jax.Array,
    labels: jax.Array,
    mesh: Mesh,
    vocab_chunk_size: int,
    dp_axis: str,
    tp_axis: str,
) -> tuple[int, int]:
    """Validate shapes/mesh at trace time; return ``(dp, tp)`` sizes. Errors name value and fix."""
    for name, axis in (("dp_axis", dp_axis), ("tp_axis", tp_axis)):
        if axis not in mesh.shape:
            raise ValueError(
                f"{name}={axis!r} is not a mesh axis (mesh axes: {tuple(mesh.axis_names)}); "
                f"pass the name of an existing axis"
            )
    if not isinstance(vocab_chunk_size, int) or isinstance(vocab_chunk_size, bool) or vocab_chunk_size < 1:
        raise ValueError(f"vocab_chunk_size={vocab_chunk_size!r} must be an int >= 1 (e.g. 8192)")
    if hidden.ndim != 2:
        raise ValueError(f"hidden must be [N, H], got shape {hidden.shape}; flatten batch/positions first")
    if lm_head.ndim != 2:
        raise ValueError(f"lm_head must be [V, H], got shape {lm_head.shape}")
    if labels.ndim != 1:
        raise ValueError(f"labels must be [N], got shape {labels.shape}; flatten batch/positions first")
    n, h = hidden.shape
    v, h2 = lm_head.shape
    if h != h2:
        raise ValueError(
            f"hidden size mismatch: hidden is {hidden.shape} but lm_head is {lm_head.shape}; "
            f"lm_head must be [V, H] with the draft's H={h} (transpose a [H, V] head)"
        )
    if labels.shape[0] != n:
        raise ValueError(f"labels has {labels.shape[0]} rows but hidden has {n}; pass one label per hidden row")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integer token ids, got dtype {labels.dtype}")
    dp, tp = int(mesh.shape[dp_axis]), int(mesh.shape[tp_axis])
    if v % tp:
        raise ValueError(f"vocab not splittable over tp: V={v} is not divisible by tp={tp}; pick tp dividing {v}")
    if n % dp:
        raise ValueError(
            f"rows not splittable over dp: N={n} is not divisible by dp={dp}; pad the batch to a multiple of {dp}"
        )
    return dp, tp


def _shard_pass(
    h: jax.Array,
    w: jax.Array,
    labels: jax.Array,
    *,
    chunk: int,
    vocab: int,
    axes: tuple[str, str],
    with_grad: bool,
) -> tuple[jax.Array, ...]:
    """Per-device body: loop over this tp shard's vocab chunks, then combine over tp.

    Returns ``(nll, pred, grad_dir)`` where ``grad_dir`` (``d nll / d h``, ``[n, H]``)
    is only computed when ``with_grad``.
    """
    dp_axis, tp_axis = axes
    n, hdim = h.shape
    v_local = w.shape[0]
    c = min(chunk, v_local)
    num_chunks = -(-v_local // c)
    offset = jax.lax.axis_index(tp_axis) * v_local  # global vocab index of this shard's row 0
    h32 = h.astype(jnp.float32)
    label_local = labels.astype(jnp.int32) - offset  # in [0, v_local) iff the label lives here

    def varying(x: jax.Array) -> jax.Array:
        # Loop carries must have the same "varies over dp/tp" type as the body's outputs.
        return jax.lax.pcast(x, (dp_axis, tp_axis), to="varying")

    def body(i: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        m, s, tgt, best_val, best_idx, *acc = carry
        start = jnp.minimum(i * c, v_local - c)  # clamp the last chunk; overlap is masked below
        wc = jax.lax.dynamic_slice_in_dim(w, start, c, axis=0).astype(jnp.float32)
        local_idx = start + jnp.arange(c, dtype=jnp.int32)
        fresh = local_idx >= i * c  # rows of an overlapping last chunk already seen -> -inf
        logits = jnp.dot(h32, wc.T, preferred_element_type=jnp.float32)
        logits = jnp.where(fresh[None, :], logits, -jnp.inf)
        cmax = jnp.max(logits, axis=1)
        m_new = jnp.maximum(m, cmax)
        scale = jnp.exp(m - m_new)
        p = jnp.exp(logits - m_new[:, None])
        s = s * scale + jnp.sum(p, axis=1)
        hit = (local_idx[None, :] == label_local[:, None]) & fresh[None, :]
        tgt = tgt + jnp.sum(jnp.where(hit, logits, 0.0), axis=1)
        carg = jnp.argmax(logits, axis=1).astype(jnp.int32) + start
        better = cmax > best_val  # strict: an earlier chunk wins ties (lowest index)
        best_val = jnp.where(better, cmax, best_val)
        best_idx = jnp.where(better, carg, best_idx)
        if with_grad:
            acc = [acc[0] * scale[:, None] + jnp.dot(p, wc, preferred_element_type=jnp.float32)]
        return (m_new, s, tgt, best_val, best_idx, *acc)

    init: list[jax.Array] = [
        jnp.full((n,), -jnp.inf, jnp.float32),
        jnp.zeros((n,), jnp.float32),
        jnp.zeros((n,), jnp.float32),
        jnp.full((n,), -jnp.inf, jnp.float32),
        jnp.zeros((n,), jnp.int32),
    ]
    if with_grad:
        init.append(jnp.zeros((n, hdim), jnp.float32))
    m, s, tgt, best_val, best_idx, *acc = jax.lax.fori_loop(0, num_chunks, body, tuple(varying(x) for x in init))

    # Combine over tp. pmax has no derivative; the max only shifts the LSE, so it is a constant.
    gmax = jax.lax.stop_gradient(jax.lax.pmax(m, tp_axis))
    rescale = jnp.exp(m - gmax)
    total = jax.lax.psum(s * rescale, tp_axis)
    lse = gmax + jnp.log(total)
    nll = lse - jax.lax.psum(tgt, tp_axis)

    top = jax.lax.pmax(best_val, tp_axis)
    cand = jnp.where(best_val == top, best_idx + offset, jnp.int32(vocab))
    pred = jax.lax.pmin(cand, tp_axis)
    pred = jnp.minimum(pred, vocab - 1)  # only reachable if every logit is NaN

    if not with_grad:
        return nll, pred
    expected_w = jax.lax.psum(acc[0] * rescale[:, None], tp_axis) / total[:, None]
    here = (label_local >= 0) & (label_local < v_local)
    w_label = jnp.take(w, jnp.clip(label_local, 0, v_local - 1), axis=0).astype(jnp.float32)
    w_label = jax.lax.psum(jnp.where(here[:, None], w_label, 0.0), tp_axis)
    return nll, pred, expected_w - w_label


def _sharded(
    mesh: Mesh, chunk: int, dp_axis: str, tp_axis: str, with_grad: bool, vocab: int
) -> Callable[..., tuple[jax.Array, ...]]:
    """The shard_map'd per-device pass (rows over dp, vocab rows over tp)."""
    out_specs = (P(dp_axis), P(dp_axis)) + ((P(dp_axis, None),) if with_grad else ())
    return jax.shard_map(
        partial(_shard_pass, chunk=chunk, vocab=vocab, axes=(dp_axis, tp_axis), with_grad=with_grad),
        mesh=mesh,
        in_specs=(P(dp_axis, None), P(tp_axis, None), P(dp_axis)),
        out_specs=out_specs,
    )


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _ce(
    hidden: jax.Array, lm_head: jax.Array, labels: jax.Array, mesh: Mesh, chunk: int, dp_axis: str, tp_axis: str
) -> tuple[jax.Array, jax.Array]:
    return _sharded(mesh, chunk, dp_axis, tp_axis, False, lm_head.shape[0])(hidden, lm_head, labels)


def _ce_fwd(
    hidden: jax.Array, lm_head: jax.Array, labels: jax.Array, mesh: Mesh, chunk: int, dp_axis: str, tp_axis: str
) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    nll, pred, grad_dir = _sharded(mesh, chunk, dp_axis, tp_axis, True, lm_head.shape[0])(hidden, lm_head, labels)
    # A zero of hidden's dtype/shape/sharding is carried only to type the cotangent cheaply.
    return (nll, pred), (grad_dir, jnp.zeros((), hidden.dtype))


def _ce_bwd(
    mesh: Mesh,
    chunk: int,
    dp_axis: str,
    tp_axis: str,
    res: tuple[jax.Array, jax.Array],
    cts: tuple[jax.Array, jax.Array],
) -> tuple[jax.Array, None, None]:
    grad_dir, proto = res
    g_nll, _ = cts  # pred is integer: no cotangent
    d_hidden = (g_nll.astype(jnp.float32)[:, None] * grad_dir).astype(proto.dtype)
    return d_hidden, None, None  # lm_head frozen (zero gradient by design); labels are integers


_ce.defvjp(_ce_fwd, _ce_bwd)


def chunked_sharded_cross_entropy(
    hidden: jax.Array,
    lm_head: jax.Array,
    labels: jax.Array,
    *,
    mesh: Mesh,
    vocab_chunk_size: int,
    dp_axis: str = DP,
    tp_axis: str = TP,
) -> tuple[jax.Array, jax.Array]:
    """Exact per-row softmax cross-entropy and full-vocab argmax, never building ``[N, V]`` logits.

    Args:
        hidden: ``[N, H]`` draft hidden states (rows sharded over ``dp_axis``); any float dtype,
            computed in float32.
        lm_head: ``[V, H]`` frozen teacher head (vocab rows sharded over ``tp_axis``). Treated as a
            constant: its gradient is zero by design (see module docstring).
        labels: ``[N]`` integer target ids in ``[0, V)`` (rows sharded over ``dp_axis``). Mask
            unwanted rows with loss weights, not with out-of-range ids (an out-of-range id gets
            ``nll = logsumexp``).
        mesh: mesh holding ``dp_axis`` and ``tp_axis`` (other axes see replicated data).
        vocab_chunk_size: vocab rows per step of the per-shard loop; peak memory is
            ``O(N/dp * (chunk + H))`` per device. Clamped to the shard size ``V / tp``.
        dp_axis, tp_axis: mesh axis names for rows and vocab.

    Returns:
        ``(nll, pred)``: ``nll`` ``[N]`` float32 = ``logsumexp(h @ W.T) - (h @ W.T)[label]``;
        ``pred`` ``[N]`` int32 = ``argmax`` over the full vocab (ties -> lowest index).
        Differentiable w.r.t. ``hidden`` (exact dense gradient); works under ``jax.jit``.

    Raises:
        ValueError: on bad shapes, ``V`` not divisible by ``tp``, ``N`` not divisible by ``dp``,
            or ``vocab_chunk_size < 1``.
    """
    _check_inputs(hidden, lm_head, labels, mesh, vocab_chunk_size, dp_axis, tp_axis)
    return _ce(hidden, jax.lax.stop_gradient(lm_head), labels, mesh, vocab_chunk_size, dp_axis, tp_axis)


def dense_cross_entropy(hidden: jax.Array, lm_head: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Reference: the same ``(nll, pred)`` from materialised ``[N, V]`` float32 logits (tests, benchmark)."""
    logits = jnp.dot(
        hidden.astype(jnp.float32), jax.lax.stop_gradient(lm_head).astype(jnp.float32).T,
        preferred_element_type=jnp.float32,
    )
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return lse - tgt, jnp.argmax(logits, axis=-1).astype(jnp.int32)
