"""What every real model made sparse in one call must show, as checks shared by the Python 3.11 tests
(tests/third_party/test_third_party.py) and the Python 3.12 script for gemma and MaxText (run_py312.py).

A `View` sees a sparsified model as a loss of one pytree ``state`` (its variables, or an NNX model's
parameters). The checks: the record names exactly the expected weights, each grouped along the axis its
product contracts, β fitted to it and every metric, mask and export reading them; the gradient is
straight through (the dense model's gradient at W̃); MVUE samples (noise that averages out over seeds
and is drawn afresh after an optimizer step) and FP8 rounds; training lowers the loss with β frozen.
"""
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import sste_jax
from sste_jax._layout import layer_shape, param_axis
from sste_jax._optim import key_name

FULL = sste_jax.SparsityConfig(mvue=True, fp8=True)


@dataclasses.dataclass
class View:
    """A sparsified model as a function of ``state``."""

    state: Any
    loss: Callable[[Any], jax.Array]  # state -> scalar, through the sparse products
    record: Callable[[Any], dict]  # state -> sste_jax.sparse_weights of the model
    weights: Callable[[Any], dict[str, jax.Array]]  # state (or its gradient) -> {weight path: array}
    dense: Callable[[Mapping[str, jax.Array]], jax.Array]  # the original model's loss with these weights
    model: Callable[[Any], Any] = lambda state: state  # state -> what sste_jax.optim.sparse_kernel_mask takes


Make = Callable[[sste_jax.SparsityConfig, int], View]  # (config, seed) -> the model made sparse with them


def check_record(view: View, axes: Mapping[str, int]) -> None:
    """The record holds exactly the weights of ``axes`` (path -> the parameter axis the product contracts),
    grouped along that axis, β fitted per layer; flip rate, masks and export see every one of them."""
    record = view.record(view.state)
    assert set(record) == set(axes), sorted(set(record) ^ set(axes))
    for name, w in record.items():
        assert param_axis(w.layout, w.axis) == axes[name], (name, w.layout, w.axis)
        operand = w.operand()
        layers = operand.reshape((-1,) + operand.shape[len(layer_shape(w.layout)):])
        fitted = [sste_jax.fit_beta(o, axis=w.axis, n=w.config.n, m=w.config.m) for o in layers]
        np.testing.assert_allclose(np.ravel(w.beta), fitted, rtol=1e-5, err_msg=name)
        grouped = jnp.moveaxis(w.forward(), axes[name], -1)
        assert int((grouped.reshape(*grouped.shape[:-1], -1, w.config.m) != 0).sum(-1).max()) <= w.config.n, name
    rates, _ = sste_jax.metrics.flip_rate(sste_jax.metrics.init_flip_state(record), record)
    assert set(rates) == {"flip_rate"} | {f"flip_rate/{n}" for n in axes}
    assert {n for n, on in _flat(sste_jax.optim.sparse_kernel_mask(view.model(view.state))).items() if on} == set(axes)


def _flat(tree) -> dict[str, Any]:
    name = lambda path: "/".join(str(key_name(k)) for k in path)  # noqa: E731
    return {name(p).removesuffix("/value"): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_straight_through(view: View) -> None:
    """Loss and gradient equal the dense model's at W̃: the forward is the N:M product, the weight gets
    W̃'s gradient (no mask, no β factor)."""
    w_tilde = {n: w.forward() for n, w in view.record(view.state).items()}
    value, grads = jax.value_and_grad(view.loss)(view.state)
    ref_value, ref_grads = jax.value_and_grad(view.dense)(w_tilde)
    np.testing.assert_allclose(value, ref_value, rtol=1e-4)
    got = view.weights(grads)
    for name in w_tilde:
        scale = float(jnp.abs(ref_grads[name]).max())
        np.testing.assert_allclose(got[name], ref_grads[name], rtol=1e-3, atol=1e-4 * scale, err_msg=name)


def _sparse_grads(view: View, state=None) -> dict[str, jax.Array]:
    state = view.state if state is None else state
    names = view.record(view.state)
    return {n: g for n, g in view.weights(jax.grad(view.loss)(state)).items() if n in names}


def _sq(tree: Mapping[str, jax.Array]) -> float:
    return float(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in tree.values()))


def check_mvue(make: Make, seeds: int = 6) -> None:
    """MVUE samples the weight gradient: per seed a different draw around the straight-through gradient, whose
    mean over ``seeds`` draws is ~seeds times closer (its mean square is 1/seeds of one draw's: < 0.5 asserted);
    and after an optimizer step the draw is new (its noise uncorrelated with the step before's, where a draw that
    repeats itself would correlate ~1). Exact unbiasedness is checked per product in tests/sste_jax/test_sparsify.py."""
    plain = make(sste_jax.SparsityConfig(), 0)
    ste = _sparse_grads(plain)
    noises = []
    for seed in range(seeds):
        view = make(sste_jax.SparsityConfig(mvue=True), seed)
        noises.append({n: g - ste[n] for n, g in _sparse_grads(view).items()})
        assert all(float(jnp.abs(x).max()) > 0 for x in noises[-1].values()), f"seed {seed}: MVUE drew nothing"
    mean = {n: sum(noise[n] for noise in noises) / seeds for n in ste}
    ratio = _sq(mean) / np.mean([_sq(noise) for noise in noises])
    assert ratio < 0.5, f"the mean of {seeds} MVUE draws is not closer to the gradient: {ratio:.3f} of one draw's"
    view = make(sste_jax.SparsityConfig(mvue=True), 0)
    update = [-1e-3 * g for g in jax.tree.leaves(jax.grad(view.loss)(view.state))]
    step = lambda state: jax.tree.unflatten(  # noqa: E731  (the same update to either view's state)
        jax.tree.structure(state), [p + u for p, u in zip(jax.tree.leaves(state), update)])
    sampled, straight = _sparse_grads(view, step(view.state)), _sparse_grads(plain, step(plain.state))
    after = {n: sampled[n] - straight[n] for n in straight}
    before = noises[0]
    corr = sum(float(jnp.vdot(before[n], after[n])) for n in before) / np.sqrt(_sq(before) * _sq(after))
    assert abs(corr) < 0.5, f"MVUE drew the same sample after an optimizer step (correlation {corr:.2f})"


def check_fp8(make: Make) -> None:
    """FP8 rounds the products: the loss moves, a little."""
    plain, fp8 = make(sste_jax.SparsityConfig(), 0), make(sste_jax.SparsityConfig(fp8=True), 0)
    a, b = float(plain.loss(plain.state)), float(fp8.loss(fp8.state))
    assert a != b and abs(a - b) < 0.05 * abs(a), (a, b)


def check_training(view: View, steps: int = 25, lr: float = 3e-3, drop: float = 0.3) -> None:
    """Adam under `sste_jax.freeze_beta` lowers the loss by ``drop``; every β stays as it was."""
    tx = sste_jax.freeze_beta(optax.adam(lr))
    before = {n: np.asarray(w.beta) for n, w in view.record(view.state).items()}

    @jax.jit
    def step(state, opt):
        loss, grads = jax.value_and_grad(view.loss)(state)
        updates, opt = tx.update(grads, opt, state)
        return optax.apply_updates(state, updates), opt, loss

    state, opt, losses = view.state, tx.init(view.state), []
    for _ in range(steps):
        state, opt, loss = step(state, opt)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - drop, losses
    after = view.record(state)
    assert all(np.array_equal(before[n], np.asarray(after[n].beta)) for n in before)


def check_all(make: Make, axes: Mapping[str, int], **training) -> None:
    plain = make(sste_jax.SparsityConfig(), 0)
    check_record(plain, axes)
    check_straight_through(plain)
    check_fp8(make)
    check_mvue(make)
    check_training(make(FULL, 0), **training)


def named(tree) -> dict[str, Any]:
    """``{path: leaf}`` of a pytree, paths as `sste_jax.sparse_weights` names them (Flax boxes seen through)."""
    return _flat(tree)


def replaced(tree, weights: Mapping[str, Any]):
    """``tree`` with the leaves at the paths of ``weights`` replaced (a Flax box keeps its place)."""
    from flax import linen as nn

    name = lambda path: "/".join(str(key_name(k)) for k in path)  # noqa: E731

    def put(path, leaf):
        value = weights.get(name(path))
        if value is None:
            return leaf
        return leaf.replace_boxed(value) if isinstance(leaf, nn.meta.AxisMetadata) else value

    return jax.tree_util.tree_map_with_path(put, tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def nnx_view(model, dense_model, loss) -> View:
    """The view of an NNX model made sparse: the state is its parameters; ``dense_model`` is the original."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    dense_graphdef, dense_params, dense_rest = nnx.split(dense_model, nnx.Param, ...)
    merge = lambda p: nnx.merge(graphdef, p, rest, copy=True)  # noqa: E731
    by_path = lambda state: {"/".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(state)}  # noqa: E731

    def dense(weights):
        flat = [(p, v.replace(weights.get("/".join(map(str, p)), v[...]))) for p, v in nnx.to_flat_state(dense_params)]
        return loss(nnx.merge(dense_graphdef, nnx.from_flat_state(flat), dense_rest, copy=True))

    return View(params, loss=lambda p: loss(merge(p)), record=lambda p: sste_jax.sparse_weights(merge(p)),
                weights=by_path, dense=dense, model=merge)
