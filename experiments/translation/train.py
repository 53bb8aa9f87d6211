"""Translation (the paper's Table 4, scaled down): Spanish→English Bible verses, 2:4 sparse feed-forwards.

    python -m experiments.translate --config small --methods dense,srste,step,sste --seeds 0
    python -m experiments.translate --config tiny   # the synthetic corpus, seconds per method (CI)

Each (seed, method) trains the `experiments.seq2seq.Transformer` of the config with its encoder and
decoder feed-forward linears as the method's layers (`experiments.methods.sparsify`; ``dense`` keeps
them dense to log the reference flip rate), on teacher-forced masked token cross entropy. Optimizer,
train step and loop are `experiments.methods`' (AdamW or STEP, warmup + cosine, clipping,
`freeze_beta`, `methods.fit`), as for the LM and the ViT.

Data (`experiments.bible`): Reina-Valera 1909 → King James, whole books held out for validation and
test (``--corpus synthetic``: a generated toy language pair, no download); a joint byte-level BPE
trained on the training pairs; ``max_len`` the 99th percentile of their lengths (capped by the
config's ``seq_len``): longer pairs are dropped, not truncated, and the counts are printed and written
to ``table.md``. A training batch holds ``batch_size`` pairs of one length bucket (widths at
percentiles of the training lengths, so padding is small), drawn as a function of (seed, step).

Evaluation, always with the forward weights of the current phase (2:4 for sparse methods): the
validation loss (masked token cross entropy over the whole validation split) every ``eval_every``
steps; at the end, BLEU (sacrebleu) of greedy (``--beam K``: beam search) translations of the test
books (``--test-per-book N``: only the first N verses of each) and, with ``--val-bleu``, of the
validation books.

``--set KEY=VALUE`` changes fields of the config's `experiments.configs.Config` (e.g. ``b2=0.98``),
``--recipe KEY=VALUE`` fields of every method's `experiments.methods.Recipe` (e.g. ``switch_max=0.3``).

Writes ``results/translation_<config>/metrics.jsonl`` (a record per log step, a ``"final"`` record
per run), ``table.md`` (train loss, validation loss, test BLEU as in Table 4), ``val_loss.png``,
``flip_rate.png`` and ``examples.md`` (the first test verses, translated by each method). For the
real run, pin one single-threaded process to a core::

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \\
        taskset -c 0 python -m experiments.translate --config small

Adam's ``b2`` is 0.999 here, not the LM's 0.95: STEP freezes ``v``, and a short-memory ``v`` holds
near-zero entries (embedding rows of tokens absent from the last few dozen batches) that blow up the
frozen-variance updates. Measured with b2 = 0.95 (seed 0): STEP diverged after its switch (final
validation loss 4.75, test BLEU 1.9 switching at step 142; 5.65 and 5.2 switching at step 321),
while with b2 = 0.999 and the switch at step 161 it reached 3.79 and 8.7.

STEP's switch (`STEP_RECIPE`) comes from a pilot of the ``small`` config, seed 0, with ``--methods
step --recipe switch_threshold=0 switch_min=1.0 switch_max=1.0`` (dense Adam throughout):
``step_v_change`` (a 40-step window) fell from 3.4e-10 at step 60 to a plateau of 2.0–2.2e-10 over
steps ~140–340, then rose to ~3e-10 as the learning rate decayed. A threshold of 2.1e-10 from
``switch_min`` = 20% on switches inside the plateau, 20–30% into training. (The same pilot with
b2 = 0.95, pruned to 2:4 after its last step without sparse training: validation loss 3.94 against
3.88 dense at step 700, test BLEU 6.8.)
"""

import argparse
import dataclasses
import functools
import pathlib
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Int

import sste_jax
from experiments import bible, methods, seq2seq
from experiments.configs import Config, parse_overrides
from experiments.data import cache_dir_default
from experiments.report import (Runs, append_record, format_spread, group_runs, plot_curves, read_records,
                                summarize_finals)

STEP_RECIPE = {"switch_threshold": 2.1e-10, "switch_min": 0.2}  # from the pilot in the module docstring


@dataclasses.dataclass(frozen=True)
class TranslationConfig:
    """``train``: model sizes (``n_layer`` encoder and ``n_layer`` decoder layers, ``d_model``,
    ``n_head``, feed-forward ``4 * d_model``), corpus, optimisation and logging; its ``seq_len`` caps
    ``max_len``. ``vocab_size``: the BPE's. ``bucket_percentiles``: the length-bucket widths, as
    percentiles of the training pairs' lengths. ``eval_batch_size``: pairs per evaluation/decoding batch."""

    train: Config
    vocab_size: int
    bucket_percentiles: tuple[float, ...] = (50.0, 85.0, 100.0)
    eval_batch_size: int = 64


CONFIGS = {
    # CI: seconds per method on the synthetic corpus.
    "tiny": TranslationConfig(
        Config(n_layer=1, n_head=2, d_model=32, seq_len=32, corpus="synthetic", tokenizer="bpe", steps=8,
               batch_size=16, lr=3e-3, min_lr=3e-4, warmup=2, log_every=4, eval_every=8),
        vocab_size=400, bucket_percentiles=(100.0,)),
    # The table: a scaled-down Transformer-base on the Bible; ~5.5 min of one CPU core per run (measured,
    # decoding test and validation books included).
    "small": TranslationConfig(
        Config(n_layer=3, n_head=4, d_model=128, seq_len=128, corpus="bible", tokenizer="bpe", steps=800,
               batch_size=32, lr=2e-3, min_lr=2e-4, warmup=80, b2=0.999, log_every=20, eval_every=100),
        vocab_size=8000),
}


class Data(NamedTuple):
    """The encoded splits of a corpus and how to batch them."""

    tokenizer: bible.TranslationTokenizer
    max_len: int
    splits: dict[str, bible.EncodedSplit]
    widths: tuple[int, ...]  # the length buckets, ascending; the last is max_len
    train_buckets: tuple[np.ndarray, ...]  # indices of the training pairs in each bucket


def pair_lengths(split: bible.EncodedSplit) -> Int[np.ndarray, " N"]:
    """Tokens per pair, the longer side with its ``<eos>`` (or ``<bos>``): the width it needs."""
    return np.maximum((split.src != seq2seq.PAD).sum(1), (split.tgt_out != seq2seq.PAD).sum(1))


def bucket_widths(lengths_N, percentiles, max_len: int) -> tuple[int, ...]:
    """Widths at the ``percentiles`` of ``lengths_N``, rounded up to multiples of 8, and ``max_len``."""
    widths = {min(max_len, -(-int(np.percentile(lengths_N, p, method="higher")) // 8) * 8) for p in percentiles}
    return tuple(sorted(widths | {max_len}))


def prepare_data(tcfg: TranslationConfig, corpus: str, cache_dir=None) -> Data:
    """Loads ``corpus``, trains (or loads) the tokenizer, picks ``max_len`` and encodes the splits."""
    pairs = bible.load_parallel(corpus, cache_dir)
    tokenizer = bible.get_translation_tokenizer(pairs["train"], tcfg.vocab_size, cache_dir or cache_dir_default())
    max_len = min(bible.max_len_for(pairs["train"], tokenizer, 99.0), tcfg.train.seq_len)
    splits = {name: bible.encode_split(p, tokenizer, max_len) for name, p in pairs.items()}
    lengths_N = pair_lengths(splits["train"])
    widths = bucket_widths(lengths_N, tcfg.bucket_percentiles, max_len)
    bucket_N = np.searchsorted(widths, lengths_N)
    buckets = tuple(np.flatnonzero(bucket_N == b) for b in range(len(widths)))
    sizes = [len(b) for b in buckets]
    if min(sizes) < tcfg.train.batch_size:
        raise ValueError(f"length buckets {widths} hold {sizes} training pairs; each needs at least "
                         f"batch_size={tcfg.train.batch_size}: change bucket_percentiles or batch_size")
    return Data(tokenizer, max_len, splits, widths, buckets)


def describe(data: Data, corpus: str) -> str:
    """One line: pairs kept and dropped per split, ``max_len``, vocabulary, buckets."""
    counts = ", ".join(f"{name} {len(s.pairs)} (+{s.n_dropped} dropped)" for name, s in data.splits.items())
    return (f"{corpus} pairs: {counts}; pairs longer than max_len={data.max_len} tokens dropped, not truncated; "
            f"BPE vocabulary {data.tokenizer.vocab_size}; length buckets {data.widths}")


def batch_at(data: Data, step: int, batch_size: int, seed: int) -> tuple[np.ndarray, ...]:
    """``(src, tgt_in, tgt_out)``, each ``(1, B, width)``: ``B`` training pairs drawn without replacement
    from one length bucket, picked with probability proportional to its size; a function of (seed, step)."""
    rng = np.random.default_rng([seed, step])
    sizes = np.array([len(b) for b in data.train_buckets])
    b = rng.choice(len(sizes), p=sizes / sizes.sum())
    idx = np.sort(rng.choice(data.train_buckets[b], batch_size, replace=False))
    split, width = data.splits["train"], data.widths[b]
    return tuple(a[idx, :width][None] for a in (split.src, split.tgt_in, split.tgt_out))


def eval_batches(split: bible.EncodedSplit, widths, batch_size: int) -> list[tuple[np.ndarray, ...]]:
    """All of ``split`` as ``(src, tgt_in, tgt_out)`` batches of ``batch_size`` pairs of one length
    bucket; a bucket's last batch is filled with copies of its first pair with all-`PAD` targets
    (they add no tokens to the loss), so each bucket compiles once."""
    bucket_N = np.searchsorted(widths, pair_lengths(split))
    batches = []
    for b, width in enumerate(widths):
        idx = np.flatnonzero(bucket_N == b)
        for i in range(0, len(idx), batch_size):
            chunk = idx[i: i + batch_size]
            rows = np.concatenate([chunk, np.full(batch_size - len(chunk), chunk[0])])
            src, tgt_in, tgt_out = (a[rows, :width] for a in (split.src, split.tgt_in, split.tgt_out))
            tgt_out = np.where(np.arange(batch_size)[:, None] < len(chunk), tgt_out, seq2seq.PAD).astype(np.int32)
            batches.append((src, tgt_in, tgt_out))
    return batches


def translation_loss(model: seq2seq.Transformer, src_BxS, tgt_in_BxT, tgt_out_BxT) -> jax.Array:
    """Masked token cross entropy of the next target token (teacher forcing)."""
    return seq2seq.masked_cross_entropy(model(src_BxS, tgt_in_BxT), tgt_out_BxT.reshape(-1))


def make_eval(graphdef):
    @jax.jit
    def nll_sum(params, rest, src_BxS, tgt_in_BxT, tgt_out_BxT):
        n_tokens = jnp.sum(tgt_out_BxT != seq2seq.PAD)
        return translation_loss(nnx.merge(graphdef, params, rest), src_BxS, tgt_in_BxT, tgt_out_BxT) * n_tokens

    return nll_sum


def validation_loss(nll_sum, state, batches) -> float:
    """Token-weighted mean cross entropy over ``batches`` (from `eval_batches`)."""
    total = sum(nll_sum(state["params"], state["rest"], *batch) for batch in batches)
    return float(total) / sum(int((batch[2] != seq2seq.PAD).sum()) for batch in batches)


def first_per_book(split: bible.EncodedSplit, n: int | None) -> np.ndarray:
    """Indices of the first ``n`` pairs of each book (all pairs when ``n`` is None), in split order."""
    seen: dict[str, int] = {}
    keep = []
    for i, pair in enumerate(split.pairs):
        seen[pair.book] = seen.get(pair.book, 0) + 1
        if n is None or seen[pair.book] <= n:
            keep.append(i)
    return np.array(keep, np.int64)


def translate_split(model, data: Data, split: bible.EncodedSplit, idx, beam: int, batch_size: int) -> list[str]:
    """Detokenised translations of the pairs ``idx`` of ``split`` (greedy, or beam search when ``beam`` > 0)."""
    decode = functools.partial(seq2seq.beam_decode, beam=beam) if beam else seq2seq.greedy_decode
    tok = data.tokenizer
    ids_NxL = seq2seq.translate(decode, model, split.src[idx], tok.bos_id, tok.eos_id, data.max_len, batch_size)
    return seq2seq.ids_to_texts(ids_NxL, tok.decode, tok.eos_id)


def recipe_for(method: str, **changes) -> methods.Recipe:
    """``method``'s recipe with the translation defaults for STEP's switch (`STEP_RECIPE`), then ``changes``."""
    is_step = method in methods.METHODS and methods.METHODS[method].optimizer == "step"
    defaults = STEP_RECIPE if is_step else {}
    return methods.get_recipe(method, **{**defaults, **changes})


def train(tcfg: TranslationConfig, method: str, seed: int, data: Data, metrics_path: pathlib.Path, *,
          beam: int = 0, test_per_book: int | None = None, val_bleu: bool = False, n_examples: int = 5,
          **recipe_changes) -> dict:
    """Trains one run, appends its records to ``metrics_path``; returns the final record.

    Log steps record the means of the train-step metrics since the last one (loss, flip rate, phase,
    STEP's ``step_v_change``) and the layers' mean β and zero fraction; eval steps add ``val_loss``.
    The final record has per-layer zero fractions, BLEU, the first ``n_examples`` test translations
    and, for STEP (or a dense finish), the first step of the second phase.
    """
    cfg = dataclasses.replace(tcfg.train, seq_len=data.max_len)
    recipe = recipe_for(method, **recipe_changes)
    model_cfg = seq2seq.Seq2SeqConfig(data.tokenizer.vocab_size, cfg.d_model, cfg.n_head, cfg.n_layer, cfg.n_layer,
                                      max_len=data.max_len)
    model = methods.sparsify(seq2seq.Transformer(model_cfg, rngs=nnx.Rngs(params=seed)), recipe, seed=seed)
    phases = methods.phases(model, recipe)
    tx = methods.make_optimizer(cfg, model, recipe)
    train_step = methods.make_train_step(translation_loss, phases, tx, recipe, cfg.steps)
    evals = [make_eval(g) for g in phases.graphdefs]
    val_batches = eval_batches(data.splits["val"], data.widths, tcfg.eval_batch_size)
    last: dict = {}
    began = time.perf_counter()

    def on_log(step, state, means):
        phase = methods.current_phase(recipe, cfg.steps, state)
        model = nnx.merge(phases.graphdefs[phase], state["params"], state["rest"])
        record = {"method": method, "seed": seed, "step": step, **means, **methods.layer_means(model)}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            record["val_loss"] = validation_loss(evals[phase], state, val_batches)
        append_record(metrics_path, record)
        last.update(record)

    state = methods.fit(train_step, methods.initial_state(model, tx),
                        lambda i: batch_at(data, i, cfg.batch_size, seed), cfg.steps, cfg.log_every, on_log)
    trained = time.perf_counter() - began
    phase = methods.current_phase(recipe, cfg.steps, state)
    final_model = nnx.merge(phases.graphdefs[phase], state["params"], state["rest"])
    stats = sste_jax.to_host(sste_jax.sparsity_stats(sste_jax.sparse_weights(final_model)))
    test, val = data.splits["test"], data.splits["val"]
    test_idx = first_per_book(test, test_per_book)
    hypotheses = translate_split(final_model, data, test, test_idx, beam, tcfg.eval_batch_size)
    final = {"method": method, "seed": seed, "final": True, "steps": cfg.steps, "phase": phase,
             "second_phase_from": methods.second_phase_from(recipe, cfg.steps, state),
             "train_loss": last["train_loss"], "val_loss": last["val_loss"],
             "test_bleu": seq2seq.bleu(hypotheses, [test.pairs[i].target for i in test_idx]),
             "n_test": len(test_idx), "examples": hypotheses[:n_examples],
             **{k: v for k, v in stats.items() if k.startswith("zero_fraction/")}}
    if val_bleu:
        val_idx = np.arange(len(val.pairs))
        final["val_bleu"] = seq2seq.bleu(translate_split(final_model, data, val, val_idx, beam, tcfg.eval_batch_size),
                                         val.references)
    final.update(train_seconds=trained, seconds=time.perf_counter() - began, **recipe_changes)
    append_record(metrics_path, final)
    return final


def summarize(runs: Runs) -> dict[str, dict[str, list[float]]]:
    """Per method, one value per seed: the final records' losses, BLEU and seconds, and the late flip
    rate over dense's (`experiments.report.summarize_finals`)."""
    return summarize_finals(runs, ("train_loss", "val_loss", "test_bleu", "val_bleu", "seconds"))


def table(summary: dict[str, dict[str, list[float]]]) -> str:
    """Table 4's columns (train loss, validation loss, test BLEU), with per-seed BLEU, validation BLEU,
    the late flip rate over dense's and the seconds per run."""
    lines = ["| method | train loss | val loss | test BLEU | test BLEU per seed | val BLEU | "
             "flip rate, last ¼ (× dense) | s per run |", "|---|---|---|---|---|---|---|---|"]
    for name, row in summary.items():
        cells = [format_spread(row["train_loss"], 3), format_spread(row["val_loss"], 3),
                 format_spread(row["test_bleu"], 2),
                 ", ".join(f"{b:.2f}" for b in row["test_bleu"]),
                 format_spread(row["val_bleu"], 2) if "val_bleu" in row else "",
                 format_spread(row["flip_ratio"], 3) if "flip_ratio" in row else "", f"{np.mean(row['seconds']):.0f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\nMean ± half the range over seeds. Losses: masked token cross entropy with the "
                               "forward weights of the final phase (2:4 for sparse methods); train loss averaged "
                               "over the last log interval. Flip-rate ratios are paired by seed (same batches).\n")


def examples(runs: Runs, split: bible.EncodedSplit, idx) -> str:
    """Markdown: source, reference and each (method, seed)'s translation of the first test verses."""
    finals = [(name, s, next(r for r in recs if r.get("final"))) for name, by in runs.items() for s, recs in by.items()]
    lines = []
    for j, i in enumerate(idx[: min(len(f["examples"]) for _, _, f in finals)]):
        pair = split.pairs[i]
        lines += [f"### {pair.book} {pair.chapter}:{pair.verse}", "", f"- **source**: {pair.source}",
                  f"- **reference**: {pair.target}"]
        lines += [f"- **{name}** (seed {s}): {f['examples'][j]}" for name, s, f in finals]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="small", choices=sorted(CONFIGS))
    p.add_argument("--corpus", choices=["bible", "synthetic"], help="default: the config's")
    p.add_argument("--methods", default="dense,srste,step,sste",
                   help="comma-separated, from " + ",".join(methods.METHODS))
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--steps", type=int, help="training steps (overrides the config)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. b2=0.98 (see experiments.configs.Config)")
    p.add_argument("--recipe", nargs="*", default=[], metavar="KEY=VALUE",
                   help="recipe changes for every method, e.g. switch_max=0.3 (see experiments.methods.Recipe)")
    p.add_argument("--beam", type=int, default=0, help="beam size for BLEU (default 0: greedy)")
    p.add_argument("--test-per-book", type=int, help="translate only the first N verses of each test book")
    p.add_argument("--val-bleu", action="store_true", help="also translate the validation books (BLEU)")
    p.add_argument("--cache-dir", help="data cache (default $SSTE_CACHE or ~/.cache/sste_jax)")
    p.add_argument("--out", help="output directory (default results/translation_<config>)")
    args = p.parse_args(argv)
    names = args.methods.split(",")
    unknown = [m for m in names if m not in methods.METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}: use some of {list(methods.METHODS)}")
    if args.beam < 0 or (args.test_per_book is not None and args.test_per_book < 1):
        p.error(f"--beam must be >= 0 and --test-per-book >= 1, got {args.beam} and {args.test_per_book}")
    changes = parse_overrides(methods.Recipe, args.recipe)
    tcfg = CONFIGS[args.config]
    corpus = args.corpus or tcfg.train.corpus
    overrides = {**parse_overrides(Config, args.set), **({} if args.steps is None else {"steps": args.steps})}
    tcfg = dataclasses.replace(tcfg, train=dataclasses.replace(tcfg.train, **overrides))
    data = prepare_data(tcfg, corpus, args.cache_dir)
    print(describe(data, corpus), flush=True)
    out = pathlib.Path(args.out or f"results/translation_{args.config}")
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    finals = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for method in names:
            finals.append(train(tcfg, method, seed, data, metrics_path, beam=args.beam,
                                test_per_book=args.test_per_book, val_bleu=args.val_bleu, **changes))
            f = finals[-1]
            print(f"{method} seed {seed}: train loss {f['train_loss']:.3f}, val loss {f['val_loss']:.3f}, "
                  f"test BLEU {f['test_bleu']:.2f} in {f['seconds']:.0f} s ({f['train_seconds']:.0f} s training)",
                  flush=True)
    runs = group_runs(read_records(metrics_path))
    test = data.splits["test"]
    n_test, books = finals[0]["n_test"], ", ".join(dict.fromkeys(p.book for p in test.pairs))
    evaluated = (f"the first {args.test_per_book} verses of each test book ({n_test} of {len(test.pairs)})"
                 if args.test_per_book else f"all {n_test} test verses")
    command = "python -m experiments.translate " + " ".join(argv if argv is not None else sys.argv[1:])
    decoding = f"beam {args.beam}" if args.beam else "greedy"
    cfg = tcfg.train
    title = (f"Spanish→English translation, config `{args.config}` ({cfg.n_layer}+{cfg.n_layer} layers, "
             f"d {cfg.d_model}), {cfg.steps} steps. Test BLEU: sacrebleu, {decoding} decoding of {evaluated} "
             f"(books {books}). Command: `{command}`\n\n{describe(data, corpus)}.\n\n")
    switches = [f"{f['method']} seed {f['seed']}: second phase from step {f['second_phase_from']} of {cfg.steps}"
                for f in finals if f["second_phase_from"]]
    text = table(summarize(runs)) + "".join(f"\n{line}." for line in switches) + ("\n" if switches else "")
    (out / "table.md").write_text(title + text)
    title_short = f"{corpus}, config {args.config}, seeds {args.seeds}"
    plot_curves(runs, "val_loss", out / "val_loss.png", "validation loss (2:4 weights)", title=title_short)
    plot_curves(runs, "flip_rate", out / "flip_rate.png", "mask flip rate per step", log=True, title=title_short)
    (out / "examples.md").write_text(f"# First test verses ({decoding} decoding)\n\n"
                                     + examples(runs, test, first_per_book(test, args.test_per_book)))
    print(text)
    return finals


if __name__ == "__main__":
    main()
