"""Gradient accumulation prunes once per optimizer step: `sste_jax.nnx.accumulate_gradients` computes each
layer's forward weight (and GEMM operands) before the micro-batch scan, with the same gradients as pruning
in every micro-batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sste_jax
from sste_jax.nnx import SparseLinear, accumulate_gradients


class _Net(nnx.Module):
    def __init__(self, config, rngs):
        self.up = SparseLinear(16, 32, config=config, rngs=rngs)
        self.down = SparseLinear(32, 8, config=config, rngs=rngs)

    def __call__(self, x):
        return self.down(jnp.tanh(self.up(x)))


def _loss(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


def _batches(a=3, tokens=8):
    x = jax.random.normal(jax.random.key(1), (a, tokens, 16))
    return x, jnp.sin(x[..., :8])


def _naive(loss_fn, model, *batches):
    """Per micro-batch ``nnx`` gradients, each layer pruning in its call: the reference."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def micro(carry, batch):
        rest, total, loss_sum = carry

        def loss(p, r):
            m = nnx.merge(graphdef, p, jax.tree.map(lambda v: v, r))
            return loss_fn(m, *batch), nnx.split(m, nnx.Param, ...)[2]

        (value, rest), g = jax.value_and_grad(loss, has_aux=True)(params, rest)
        return (rest, jax.tree.map(jnp.add, total, g), loss_sum + value), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    rest, total, loss_sum = jax.lax.scan(micro, (rest, zeros, jnp.zeros((), jnp.float32)), batches)[0]
    nnx.update(model, rest)
    n = jax.tree.leaves(batches)[0].shape[0]
    return loss_sum / n, jax.tree.map(lambda g: g / n, total)


def _split_jit(fn, model):
    """``fn(model, *batches)`` jitted over the model's state; returns ``(f, state)``."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, *b: fn(_loss, nnx.merge(graphdef, s), *b)), state


def _scan_eqn(jaxpr):
    [eqn] = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    return eqn


def _counts(fn, model, *batches, op=" abs "):
    """``(inside the micro-batch scan, outside it)`` counts of ``op`` in the jaxpr of ``fn``."""
    f, state = _split_jit(fn, model)
    closed = jax.make_jaxpr(f)(state, *batches)
    [outer] = [e for e in closed.jaxpr.eqns if e.primitive.name in ("pjit", "jit")]
    text = str(outer.params["jaxpr"])
    body = str(_scan_eqn(outer.params["jaxpr"].jaxpr).params["jaxpr"])
    return body.count(op), text.count(op) - body.count(op)


@pytest.mark.parametrize("method", ["sste", "ste", "srste"])
def test_prunes_once_outside_the_micro_batch_scan(method):
    model = _Net(sste_jax.SparsityConfig(method=method), nnx.Rngs(0))
    batches = _batches()
    inside, outside = _counts(accumulate_gradients, model, *batches)
    naive_inside, naive_outside = _counts(_naive, model, *batches)
    assert (inside, naive_outside) == (0, 0)  # no pruning (|W| of the top-2 / soft threshold) per micro-batch
    assert outside == naive_inside > 0  # the same prunes (and SR-STE's decay term), once per step
    if method == "sste":
        assert outside == 2 * 4  # 2 layers x 4 abs per soft-threshold pruning


def test_prunes_once_with_mvue_keeping_its_per_micro_batch_draws():
    model = _Net(sste_jax.SparsityConfig(mvue=True), nnx.Rngs(0, sparsity=1))
    batches = _batches()
    inside, outside = _counts(accumulate_gradients, model, *batches)
    naive_inside, _ = _counts(_naive, model, *batches)
    assert (naive_inside - inside, outside) == (2 * 4, 2 * 4)  # MVUE's own |g| stays in the loop
    keys = _counts(accumulate_gradients, model, *batches, op="random_fold_in")
    assert keys == _counts(_naive, model, *batches, op="random_fold_in") and keys[0] > 0  # keys drawn in the loop


@pytest.mark.parametrize("config", [
    sste_jax.SparsityConfig(), sste_jax.SparsityConfig(method="ste"), sste_jax.SparsityConfig(method="srste"),
    sste_jax.SparsityConfig(method="tsrste"), sste_jax.SparsityConfig(method="dense"),
    sste_jax.SparsityConfig(fp8=True), sste_jax.SparsityConfig(mvue=True),
], ids=lambda c: f"{c.method}{'-mvue' if c.mvue else ''}{'-fp8' if c.fp8 else ''}")
def test_gradients_equal_pruning_per_micro_batch(config):
    batches = _batches()
    results = []
    for fn in (accumulate_gradients, _naive):
        model = _Net(config, nnx.Rngs(0, sparsity=1))
        f, state = _split_jit(fn, model)
        results.append(f(state, *batches))
    (loss, grads), (ref_loss, ref_grads) = results
    np.testing.assert_array_equal(loss, ref_loss)
    jax.tree.map(np.testing.assert_array_equal, grads, ref_grads)  # the same keys with MVUE: the same draws
    assert float(jnp.abs(grads["up"]["kernel"][...]).sum()) > 0


def test_mvue_draws_per_micro_batch_from_its_input_and_holds_no_state():
    model = _Net(sste_jax.SparsityConfig(mvue=True), nnx.Rngs(0, sparsity=1))
    x, y = _batches(a=2)
    def keys():
        return [np.asarray(jax.random.key_data(layer.mvue_key[...])) for layer in (model.up, model.down)]

    before = keys()
    _, twice = accumulate_gradients(_loss, model, jnp.stack([x[0], x[0]]), jnp.stack([y[0], y[0]]))
    assert all(np.array_equal(a, b) for a, b in zip(keys(), before))  # no key or counter advanced
    _, first = accumulate_gradients(_loss, model, x[:1], y[:1])  # the first micro-batch's gradient alone
    _, second = accumulate_gradients(_loss, model, x[1:], y[1:])
    # the same micro-batch and weights: the same draw, twice
    np.testing.assert_allclose(twice["up"]["kernel"][...], first["up"]["kernel"][...], rtol=1e-6, atol=1e-7)
    # two micro-batches: each its own draw, averaged
    _, both = accumulate_gradients(_loss, model, x, y)
    mean = (first["up"]["kernel"][...] + second["up"]["kernel"][...]) / 2
    np.testing.assert_allclose(both["up"]["kernel"][...], mean, rtol=1e-6, atol=1e-7)
    assert not np.array_equal(first["up"]["kernel"][...], second["up"]["kernel"][...])


def test_sparse_dense_takes_a_pruned_weight_with_the_same_gradient():
    kernel = jax.random.normal(jax.random.key(0), (16, 8))
    x = jax.random.normal(jax.random.key(1), (4, 16))
    config = sste_jax.SparsityConfig(method="srste")
    pruned = sste_jax.prune_weight(kernel, 1.0, config)
    loss = lambda k, p: jnp.sum(jnp.sin(sste_jax.sparse_dense(x, k, 1.0, config=config, pruned=p)))  # noqa: E731
    np.testing.assert_array_equal(jax.grad(loss)(kernel, pruned), jax.grad(loss)(kernel, None))
    np.testing.assert_array_equal(jax.grad(loss, argnums=1)(kernel, pruned).weight, 0)  # nothing flows to W̃


@pytest.mark.outside_annotations
def test_a_pruned_weight_of_another_kernel_or_method_is_refused():
    kernel = jnp.ones((16, 8))
    pruned = sste_jax.prune_weight(kernel, 1.0, sste_jax.SparsityConfig())
    with pytest.raises(ValueError, match=r"pruned.weight is float32\[16, 8\] but the kernel is bfloat16\[16, 8\]"):
        sste_jax.sparse_dense(jnp.ones((2, 16)), kernel.astype(jnp.bfloat16), 1.0, pruned=pruned)
    with pytest.raises(ValueError, match=r"pruned.weight is float32\[16, 8\] but the kernel is float32\[16, 4\]"):
        sste_jax.sparse_dense(jnp.ones((2, 16)), kernel[:, :4], 1.0, pruned=pruned)
    with pytest.raises(ValueError, match="not made for method='srste', matmul='xla'"):
        sste_jax.sparse_dense(jnp.ones((2, 16)), kernel, 1.0, config=sste_jax.SparsityConfig(method="srste"),
                              pruned=pruned)
    with pytest.raises(TypeError, match="pruned must be a PrunedWeight"):
        sste_jax.sparse_dense(jnp.ones((2, 16)), kernel, 1.0, pruned=pruned.weight)
    with pytest.raises(ValueError, match="same leading axis"):
        accumulate_gradients(_loss, _Net(sste_jax.SparsityConfig(), nnx.Rngs(0)), jnp.ones((2, 4, 16)),
                             jnp.ones((3, 4, 8)))


@pytest.mark.parametrize("fp8", [False, True])
def test_cutlass_operands_are_emitted_once_outside_the_scan(monkeypatch, fp8):
    from types import SimpleNamespace

    from sste_jax import _backend

    monkeypatch.setattr(_backend, "jax", SimpleNamespace(default_backend=lambda: "gpu"))  # resolve as on a GPU
    config = sste_jax.SparsityConfig(mvue=True, fp8=fp8, matmul="cutlass")
    model = SparseLinear(256, 384, config=config, rngs=nnx.Rngs(0, sparsity=1), param_dtype=jnp.float32)
    x = jnp.ones((2, 128, 256), jnp.bfloat16)
    loss = lambda m, x: jnp.sum(m(x).astype(jnp.float32) ** 2)  # noqa: E731
    emitted = "name=sste_forward_weight"  # the emitter's outputs carry W̃'s checkpoint name
    texts = {}
    for fn in (accumulate_gradients, _naive):
        graphdef, state = nnx.split(model)
        f = jax.jit(lambda s, x, fn=fn: fn(loss, nnx.merge(graphdef, s), x))
        [outer] = [e for e in jax.make_jaxpr(f)(state, x).jaxpr.eqns if e.primitive.name in ("pjit", "jit")]
        texts[fn] = str(_scan_eqn(outer.params["jaxpr"].jaxpr).params["jaxpr"]), str(outer.params["jaxpr"])
    (body, text), (naive_body, _) = texts[accumulate_gradients], texts[_naive]
    per_step = 3 if fp8 else 2  # values, E (and the e4m3 scale)
    assert (body.count(emitted), naive_body.count(emitted)) == (0, 1 + per_step)  # W̃ and its operands in the loop
    assert naive_body.count(" abs ") - body.count(" abs ") == 4 + fp8  # a soft threshold (and W̃'s e4m3 scale) moved out
    assert text.count(emitted) == per_step  # emitted once per step
    f = jax.jit(lambda s, x: accumulate_gradients(loss, nnx.merge(graphdef, s), x))
    lowered = f.trace(state, x).lower(lowering_platforms=("cuda",)).as_text()
    fwd, wgrad = ("e4m3", "e5m2") if fp8 else ("bf16", "bf16")
    assert f"@sste_cutlass_sparse_{fwd}" in lowered and f"@sste_cutlass_sparse_{wgrad}" in lowered


@pytest.mark.parametrize("method,grad_accum", [("sste", 1), ("sste", 2), ("sste_mvue", 2), ("step", 1)])
def test_train_step_matches_pruning_per_micro_batch(method, grad_accum):  # "step": two graphs, lax.switch
    from experiments.common import loop
    from experiments.common.recipes import make_optimizer
    from experiments.common.schedule import Schedule
    from experiments.lm import data
    from experiments.lm import train as lm_train
    from experiments.lm.configs import get_config

    cfg = get_config("tiny", ["steps=4", f"grad_accum={grad_accum}"])
    tokens = data.token_splits(data.load_corpus("synthetic"), data.get_tokenizer("byte"), None)
    run = lm_train.make_run(cfg, method)
    model = lm_train.build_model(run, 256)
    task = lm_train.make_task(cfg, 0, *tokens)
    tx = make_optimizer(cfg.optim, model, run.recipe(), run.sparse_lr_scale)
    state = loop.initial_state(model, tx)
    batch = task.batch_at(0)
    assert batch[0].shape[0] == grad_accum
    _, metrics = loop.make_train_step(task.loss_fn, Schedule(model, run.recipe(), cfg.optim.steps), tx)(state, *batch)
    graphdef = nnx.graphdef(model)
    ref_loss, ref_grads = jax.jit(lambda s, *b: _naive(task.loss_fn, nnx.merge(graphdef, s), *b))(
        nnx.state(model), *batch)
    if grad_accum == 1:  # one micro-batch: bit-identical
        np.testing.assert_array_equal(metrics["train_loss"], ref_loss)
        np.testing.assert_array_equal(metrics["grad_norm"], optax.tree.norm(ref_grads))
        return
    # summed in the same order; XLA may fuse the two programs differently
    np.testing.assert_allclose(metrics["train_loss"], ref_loss, rtol=4 * np.finfo(np.float32).eps)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(ref_grads), rtol=8 * np.finfo(np.float32).eps)
