"""How far apart the ways of serving one run are: the trained model, its densified and compressed
copies (`experiments.lm.sample.with_weights`), and exports read back (`experiments.lm.export_hf.import_hf`,
and with ``--transformers`` the export's own model in ``transformers``).

    python -m experiments.lm.agreement --workdir runs/tiny_sste --export runs/tiny_sste_hf [--transformers]

For each way: the largest |logit - trained logit| over every position of one sequence (the prompt
and the trained model's sampled continuation, all positions at once), and whether sampling with the
same settings and seed gives the trained model's tokens (``transformers`` samples with its own
random numbers, so only its logits are compared). Prints a Markdown table.
"""

import argparse
import sys

import jax.numpy as jnp
import numpy as np

from experiments.common import flags
from experiments.lm import sample
from experiments.lm.export_hf import import_hf
from experiments.lm.train import load_run


def _logits(model, ids_1xT) -> np.ndarray:
    return np.asarray(model(ids_1xT), np.float32).reshape(ids_1xT.shape[1], -1)


def _transformers_logits(directory: str, ids_1xT, vocab: int) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        return hf(torch.from_numpy(np.asarray(ids_1xT, np.int64))).logits.float().numpy()[0, :, :vocab]


def measure(workdir: str, exports=(), *, prompt: str = "\n", tokens: int = 32, temperature: float = 1.0,
            top_k: int = 0, seed: int = 0, transformers: bool = False) -> list[tuple[str, float, bool | None]]:
    """``[(way, max |Δ logit| from the trained model, same tokens or None)]`` for each way of serving
    the run in ``workdir`` (see the module docstring)."""

    model, tokenizer, _ = load_run(workdir)
    prompt_1xP = jnp.asarray([tokenizer.encode(prompt)])
    settings = dict(temperature=temperature, top_k=top_k, seed=seed)
    ways = {w: sample.with_weights(model, w) for w in sample.WEIGHTS}
    ways.update({f"export {d} (import_hf)": import_hf(d, sample.with_weights(model, "trained")) for d in exports})
    trained_tokens = np.asarray(sample.generate(ways["trained"], prompt_1xP, tokens, **settings))
    ids_1xT = jnp.concatenate([prompt_1xP, jnp.asarray(trained_tokens)], axis=1)
    reference = _logits(ways["trained"], ids_1xT)
    rows = []
    for name, served in ways.items():
        same = np.array_equal(np.asarray(sample.generate(served, prompt_1xP, tokens, **settings)), trained_tokens)
        rows.append((name, float(np.max(np.abs(_logits(served, ids_1xT) - reference))), same))
    for d in exports if transformers else ():
        theirs = _transformers_logits(d, ids_1xT, reference.shape[1])
        rows.append((f"export {d} (transformers)", float(np.max(np.abs(theirs - reference))), None))
    return rows


def table(rows) -> str:
    lines = ["| way | max abs logit difference from trained | same sampled tokens |", "|---|---|---|"]
    yes_no = {True: "yes", False: "no", None: "not compared"}
    return "\n".join(lines + [f"| {name} | {diff:.3g} | {yes_no[same]} |" for name, diff, same in rows])


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="the training run (its run.json and checkpoints)")
    p.add_argument("--export", nargs="+", default=[], help="export_hf folders of that run")
    p.add_argument("--transformers", action="store_true", help="also compare the exports' logits in transformers")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--tokens", type=flags.integer(1), default=32, help="new tokens (prompt + tokens <= seq_len)")
    p.add_argument("--temperature", type=flags.number(minimum=0), default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=flags.integer(0), default=0, help="0: all tokens")
    p.add_argument("--seed", type=flags.integer(0), default=0)
    args = p.parse_args(argv)
    try:
        rows = measure(args.workdir, args.export, prompt=args.prompt, tokens=args.tokens,
                       temperature=args.temperature, top_k=args.top_k, seed=args.seed, transformers=args.transformers)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    text = table(rows)
    print(text)
    return text


if __name__ == "__main__":
    main()
