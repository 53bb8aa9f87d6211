"""The checks of `checks.py` on the models that need Python >= 3.12: Google DeepMind's gemma and Google's
MaxText 0.2.5 (its default layout: scanned layers, parameters stacked on axis 1, remat). Run by
tests/third_party/test_third_party.py in the environment `setup_py312.sh` makes::

    .venv312/bin/python tests/third_party/run_py312.py maxtext-linen   # or gemma, maxtext-nnx, maxtext-attention-out
"""
import dataclasses
import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("DECOUPLE_GCLOUD", "TRUE")
HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

import jax  # noqa: E402
import optax  # noqa: E402

import sste_jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import checks  # noqa: E402


def gemma():
    import gemma_model

    tiny = gemma_model.build()
    xent = lambda logits: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        logits[:, :-1], tiny.tokens[:, 1:]).mean()

    def make(config, seed):
        sparse = sste_jax.sparsify(tiny.model, sste_jax.feed_forward(config), seed=seed)
        variables = sparse.init(jax.random.key(0), tiny.tokens)
        return checks.View(
            variables, loss=lambda v: xent(sparse.apply(v, tiny.tokens).logits), record=sste_jax.sparse_weights,
            weights=lambda tree: checks.named(tree["params"]),
            dense=lambda w: xent(tiny.model.apply({"params": checks.replaced(variables["params"], w)},
                                                  tiny.tokens).logits))

    # gating_einsum (2, D, F): contracts D, axis 1; linear (F, D): contracts F, axis 0
    axes = {f"layer_{i}/mlp/{n}": a for i in (0, 1) for n, a in (("gating_einsum", 1), ("linear", 0))}
    checks.check_all(make, axes)


def _maxtext_linen(rules, axes):
    import maxtext_model

    tiny = maxtext_model.build(2)  # scan_layers=True, param_scan_axis=1: MaxText's defaults

    def make(config, seed):
        sparse = sste_jax.sparsify(tiny.model, rules(config), seed=seed)
        keys = dict(zip(("params", "dropout", "aqt"), jax.random.split(jax.random.key(0), 3)))
        variables = sparse.init(keys, tiny.tokens, tiny.positions, tiny.segment_ids, enable_dropout=False)
        apply = lambda v, tokens: maxtext_model.apply(sparse, v, tokens)  # noqa: E731
        dense = lambda v, tokens: maxtext_model.apply(tiny.model, v, tokens)  # noqa: E731
        return checks.View(
            variables, loss=lambda v: maxtext_model.loss(v, apply, tiny.tokens), record=sste_jax.sparse_weights,
            weights=lambda tree: checks.named(tree["params"]),
            dense=lambda w: maxtext_model.loss({"params": checks.replaced(variables["params"], w)}, dense, tiny.tokens))

    checks.check_all(make, axes)


def maxtext_linen():
    # wi_0, wi_1 (embed, layers, mlp) contract embed (axis 0); wo (mlp, layers, embed) contracts mlp (axis 0)
    axes = {f"decoder/layers/mlp/{n}/kernel": 0 for n in ("wi_0", "wi_1", "wo")}
    _maxtext_linen(sste_jax.feed_forward, axes)


def maxtext_attention_out():
    # out (heads, layers, head_dim, embed) contracts heads and head_dim: groups along head_dim (axis 2) by
    # default, along heads (axis 0) when asked
    for group_axis, axis in ((None, 2), (0, 0)):
        rules = lambda config, g=group_axis: {  # noqa: E731
            "decoder/layers/self_attention/out": dataclasses.replace(config, group_axis=g)}
        _maxtext_linen(rules, {"decoder/layers/self_attention/out/kernel": axis})


def maxtext_nnx():
    import maxtext_model

    _, _, tokens = maxtext_model.build_nnx(2)

    def loss(model):
        return maxtext_model.nnx_loss(model, tokens)

    positions, segments = maxtext_model._inputs(tokens)

    def make(config, seed):
        model, _, _ = maxtext_model.build_nnx(2)
        sparse = sste_jax.sparsify(model, sste_jax.feed_forward(config), seed=seed, decoder_input_tokens=tokens,
                                   decoder_positions=positions, decoder_segment_ids=segments, enable_dropout=False)
        return checks.nnx_view(sparse, maxtext_model.build_nnx(2)[0], loss)

    checks.check_all(make, {f"decoder/layers/mlp/{n}/kernel": 0 for n in ("wi_0", "wi_1", "wo")})


CASES = {"gemma": gemma, "maxtext-linen": maxtext_linen, "maxtext-nnx": maxtext_nnx,
         "maxtext-attention-out": maxtext_attention_out}

if __name__ == "__main__":
    with jax.numpy_rank_promotion("allow"):
        CASES[sys.argv[1]]()
    print(f"{sys.argv[1]}: all checks passed")
