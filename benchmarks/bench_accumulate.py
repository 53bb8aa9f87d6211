"""Gradient accumulation: `sste_jax.nnx.accumulate_gradients` (prune once per step) against pruning in every
micro-batch (a plain ``jax.lax.scan`` of ``jax.value_and_grad``), on the same model and micro-batches.

An MLP of two `SparseLinear` layers (``d → 4d → d``) takes ``A`` micro-batches of ``T`` tokens per step. Both
steps are jitted; interleaved rounds, medians; the ratio is the plain scan's time over ours in the same
rounds. Also reported: where XLA put the soft-threshold's ``abs`` ops of the plain scan (inside the compiled
while loop or hoisted out by its loop-invariant code motion), read from the compiled HLO.

    python benchmarks/bench_accumulate.py    # prints, writes benchmarks/results/bench_accumulate_<platform>.json
"""

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

import sste_jax
from sste_jax.nnx import SparseLinear, accumulate_gradients


class _MLP(nnx.Module):
    def __init__(self, d, config, rngs):
        self.up = SparseLinear(d, 4 * d, config=config, rngs=rngs)
        self.down = SparseLinear(4 * d, d, config=config, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


def _loss(model, x):
    return jnp.mean((model(x) - x) ** 2)


def _plain(loss_fn, model, xs):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def micro(carry, x):
        rest, total, loss_sum = carry

        def loss(p, r):
            m = nnx.merge(graphdef, p, jax.tree.map(lambda v: v, r))
            return loss_fn(m, x), nnx.split(m, nnx.Param, ...)[2]

        (value, rest), g = jax.value_and_grad(loss, has_aux=True)(params, rest)
        return (rest, jax.tree.map(jnp.add, total, g), loss_sum + value), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    rest, total, loss_sum = jax.lax.scan(micro, (rest, zeros, jnp.zeros((), jnp.float32)), xs)[0]
    n = xs.shape[0]
    return loss_sum / n, jax.tree.map(lambda g: g / n, total)


def _abs_in_while(hlo: str) -> tuple[int, int]:
    """``(abs ops reachable from a while body, abs ops elsewhere)`` in compiled HLO text."""
    comps, entry, cur = {}, None, None
    for line in hlo.splitlines():
        head = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head:
            cur = head.group(2)
            comps[cur] = []
            entry = cur if head.group(1) else entry
        elif cur:
            comps[cur].append(line)
    calls = {c: set(re.findall(r"(?:calls|body|condition|to_apply)=%?([\w.\-]+)", "\n".join(ls)))
             for c, ls in comps.items()}

    def reach(c, seen):
        for d in calls.get(c, ()):
            if d not in seen:
                seen.add(d)
                reach(d, seen)
        return seen

    bodies = {b for ls in comps.values() for line in ls for b in re.findall(r"body=%?([\w.\-]+)", line)}
    inside = set().union(*(reach(b, {b}) for b in bodies)) if bodies else set()
    count = lambda cs: sum("\n".join(comps[c]).count(" abs(") for c in cs)  # noqa: E731
    return count(inside), count(reach(entry, {entry}) - inside)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    model = _MLP(args.d, sste_jax.SparsityConfig(), nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    xs = jax.random.normal(jax.random.key(1), (args.micro, args.tokens, args.d))
    steps = {name: jax.jit(lambda s, xs, fn=fn: fn(_loss, nnx.merge(graphdef, s), xs))
             for name, fn in (("plain_scan", _plain), ("accumulate_gradients", accumulate_gradients))}
    placement = {name: _abs_in_while(f.lower(state, xs).compile().as_text()) for name, f in steps.items()}
    for f in steps.values():
        jax.block_until_ready(f(state, xs))
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, f in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(f(state, xs))
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "platform": jax.default_backend(), "device": str(jax.devices()[0]), "jax": jax.__version__,
        "d": args.d, "tokens": args.tokens, "micro_batches": args.micro, "rounds": args.rounds,
        "median_s": median, "ratio_plain_over_ours": median["plain_scan"] / median["accumulate_gradients"],
        "abs_ops_in_while_body_and_outside": placement,
    }
    for name in steps:
        inside, outside = placement[name]
        print(f"{name:22s} {median[name] * 1e3:9.2f} ms   abs ops: {inside} in the while body, {outside} outside")
    print(f"plain / ours: {result['ratio_plain_over_ours']:.3f}")
    out = Path(__file__).parent / "results" / f"bench_accumulate_{jax.default_backend()}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
