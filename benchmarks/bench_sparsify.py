"""`sste_jax.sparsify` against `SparseLinear` layers and the dense model: the jitted training step of the same
GPT-style blocks (attention dense, feed-forward 2:4, S-STE + MVUE), side by side in one process.

Three copies of one model: ``dense`` (plain ``nnx.Linear``), ``layers`` (the feed-forward linears swapped for
`sste_jax.nnx.SparseLinear`), ``sparsify`` (the unmodified model through `sste_jax.sparsify`, its products
rewritten in the traced program). The step is ``nnx.value_and_grad`` + Adam under ``nnx.jit``; interleaved
rounds, medians; ratios to ``layers`` in the same rounds. Also timed once each: the first call (trace and
compile), where the rewrite's extra tracing shows.

    python benchmarks/bench_sparsify.py   # prints, writes benchmarks/results/bench_sparsify_<platform>.json
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import sste_jax
from sste_jax.nnx import SparseLinear


class _Block(nnx.Module):
    def __init__(self, d, rngs):
        self.attn = nnx.Linear(d, d, rngs=rngs)
        self.up = nnx.Linear(d, 4 * d, rngs=rngs)
        self.down = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(x)
        return x + self.down(jax.nn.gelu(self.up(x)))


class _Net(nnx.Module):
    def __init__(self, d, layers, rngs):
        self.blocks = nnx.List([_Block(d, rngs) for _ in range(layers)])

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _models(d, layers, config, x):
    dense = _Net(d, layers, nnx.Rngs(0))
    swapped = _Net(d, layers, nnx.Rngs(0))
    for block in swapped.blocks:
        block.up = SparseLinear.from_linear(block.up, config, rngs=nnx.Rngs(1))
        block.down = SparseLinear.from_linear(block.down, config, rngs=nnx.Rngs(2))
    rules = {r"blocks/\d+/(up|down)": config}
    return {"dense": dense, "layers": swapped, "sparsify": sste_jax.sparsify(_Net(d, layers, nnx.Rngs(0)), rules, x)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    x = jax.random.normal(jax.random.key(0), (args.tokens, args.d))
    config = sste_jax.SparsityConfig(mvue=True)
    models = _models(args.d, args.layers, config, x)

    @nnx.jit
    def step(model, opt):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - x) ** 2))(model)
        opt.update(model, grads)
        return loss

    opts = {n: nnx.Optimizer(m, sste_jax.freeze_beta(optax.adam(1e-3)), wrt=nnx.Param) for n, m in models.items()}
    first = {}
    for name, model in models.items():
        start = time.perf_counter()
        jax.block_until_ready(step(model, opts[name]))
        first[name] = time.perf_counter() - start
    times = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            start = time.perf_counter()
            jax.block_until_ready(step(model, opts[name]))
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "platform": jax.default_backend(), "device": str(jax.devices()[0]), "jax": jax.__version__,
        "d": args.d, "layers": args.layers, "tokens": args.tokens, "rounds": args.rounds, "config": "sste+mvue",
        "median_step_s": median, "first_call_s": first,
        "step_ratio_to_layers": {n: median[n] / median["layers"] for n in models},
        "step_range_s": {n: [min(t), max(t)] for n, t in times.items()},
    }
    for name in models:
        print(f"{name:9s} step {median[name] * 1e3:8.2f} ms ({median[name] / median['layers']:.3f}x layers; "
              f"rounds {min(times[name]) * 1e3:.1f}-{max(times[name]) * 1e3:.1f} ms)   first call {first[name]:.2f} s")
    out = Path(__file__).parent / "results" / f"bench_sparsify_{jax.default_backend()}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
