"""Table 4 scaled down: every method against dense on Spanish→English translation, BLEU and losses
over seeds, with the first test verses as each method translates them.

    python -m experiments.translation.compare --config small --seeds 0        # dense srste step sste
    python -m experiments.translation.compare --config tiny                   # synthetic corpus (CI)

Runs go one per core as single-threaded processes of `experiments.translation.train`
(`experiments.common.runner`); each lives in ``<runs-dir>/<method>_s<seed>`` (default
``runs/translation_<config>``), finished ones are reused, interrupted ones resumed, and a folder
holding other settings is refused. ``--set`` and ``--recipe`` apply to every method (STEP's recipe
starts from `experiments.translation.configs.STEP_RECIPE`); ``--beam``, ``--test-per-book`` and
``--val-bleu`` choose the final decoding. Every method of a seed sees the same batches and initial
weights, so differences to dense are paired by seed (a 95% interval from 2 seeds on). Writes
``table.md``, ``val_loss.png``, ``flip_rate.png`` and ``examples.md`` to ``--out`` (default
``<runs-dir>/report``).
"""

import argparse
import pathlib
import sys
import time

import numpy as np

from experiments.common import cache, cli, flags, loop, report, runner
from experiments.common.cache import cache_dir_default
from experiments.translation import data as bible
from experiments.translation.configs import CONFIGS, get_config
from experiments.translation.train import describe, first_per_book, make_run, prepare_data

PAIRS = (("sste", "srste"), ("sste", "step"), ("step", "srste"))
MAIN = ("dense", "srste", "step", "sste")
KEYS = ("train_loss", "val_loss", "test_bleu", "val_bleu", "seconds", "decode_seconds")


def run_dir(runs_dir: pathlib.Path, method: str, seed: int) -> pathlib.Path:
    return runs_dir / f"{method}_s{seed}"


def plan(config: str, methods, seeds, overrides, runs_dir: pathlib.Path, *, recipe=(), beam: int = 0,
         test_per_book: int | None = None, val_bleu: bool = False, cache_dir=None) -> list[runner.Planned]:
    """The runs of ``methods`` x ``seeds``, each with the overrides, recipe changes and decoding options."""
    cfg = get_config(config, overrides)
    changes = cli.parse_recipe(recipe)
    args = ("--config", config, *(("--set", *overrides) if overrides else ()),
            *(("--recipe", *recipe) if recipe else ()), *(("--beam", str(beam)) if beam else ()),
            *(("--test-per-book", str(test_per_book)) if test_per_book is not None else ()),
            *(("--val-bleu",) if val_bleu else ()), *(("--cache-dir", str(cache_dir)) if cache_dir else ()))
    return [runner.Planned(method, seed, make_run(cfg, method, seed, recipe_changes=changes, beam=beam,
                                                  test_per_book=test_per_book, val_bleu=val_bleu),
                           run_dir(runs_dir, method, seed), args)
            for method in methods for seed in seeds]


def summarize(runs: report.Runs) -> dict[str, dict[str, list[float]]]:
    """Per method, one value per seed: the final records' losses, BLEU and seconds, the late flip rate
    over dense's and, with dense and 2+ seeds, the differences to dense (paired by seed)."""
    out = report.summarize_finals(runs, KEYS)
    for row in out.values():
        if "dense" in out and len(row["val_loss"]) >= 2:
            for key in ("val_loss", "test_bleu"):
                row[f"{key}_gap"] = [v - d for v, d in zip(row[key], out["dense"][key])]
    return out


def table(summary: dict[str, dict[str, list[float]]]) -> str:
    """Table 4's columns (train loss, validation loss, test BLEU), with per-seed BLEU, validation BLEU,
    the late flip rate over dense's, seconds per run and, from 2 seeds on, the differences to dense and
    the test-BLEU differences of `PAIRS`."""
    lines = ["| method | train loss | val loss | test BLEU | test BLEU per seed | val BLEU | "
             "flip rate, last ¼ (× dense) | s per run |", "|---|---|---|---|---|---|---|---|"]
    for name, row in summary.items():
        seconds = np.add(row["seconds"], row.get("decode_seconds", 0.0))
        cells = [report.format_spread(row["train_loss"], 3), report.format_spread(row["val_loss"], 3),
                 report.format_spread(row["test_bleu"], 2), ", ".join(f"{b:.2f}" for b in row["test_bleu"]),
                 report.format_spread(row["val_bleu"], 2) if "val_bleu" in row else "",
                 report.format_spread(row["flip_ratio"], 3) if "flip_ratio" in row else "", f"{np.mean(seconds):.0f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    gaps = [(name, row) for name, row in summary.items() if name != "dense" and "val_loss_gap" in row]
    if gaps:
        lines += ["", "| method | val loss − dense (95% CI) | test BLEU − dense (95% CI) |", "|---|---|---|"]
        lines += [f"| {name} | {report.format_interval(row['val_loss_gap'], 3)} | "
                  f"{report.format_interval(row['test_bleu_gap'], 2)} |" for name, row in gaps]
        differences = report.difference_table(summary, PAIRS, "test_bleu", 2, "test BLEU")
        if differences:
            lines += ["", differences.rstrip("\n")]
    return "\n".join(lines) + (
        "\n\nMean ± half the range over seeds. Losses: masked token cross entropy with the forward weights of "
        "the final phase (2:4 for sparse methods); train loss averaged over the last log interval. Seconds: "
        "training and decoding. Flip-rate ratios and differences to dense are paired by seed (same batches "
        "and initial weights); intervals are two-sided 95% Student-t, * where they exclude 0.\n")


def switches(runs: report.Runs) -> list[str]:
    """A line per run with a second phase (STEP's switch, a dense finish): where it began."""
    lines = []
    for name, by_seed in runs.items():
        for seed, records in sorted(by_seed.items()):
            f = report.final_record(records)
            if f.get("second_phase_from"):
                lines.append(f"{name} seed {seed}: second phase from step {f['second_phase_from']} of {f['steps']}")
    return lines


def examples(runs: report.Runs, split: bible.EncodedSplit, idx) -> str:
    """Markdown: source, reference and each (method, seed)'s translation of the first test verses."""
    finals = [(name, s, report.final_record(recs)) for name, by in runs.items() for s, recs in sorted(by.items())]
    lines = []
    for j, i in enumerate(idx[: min(len(f["examples"]) for _, _, f in finals)]):
        pair = split.pairs[i]
        lines += [f"### {pair.book} {pair.chapter}:{pair.verse}", "", f"- **source**: {pair.source}",
                  f"- **reference**: {pair.target}"]
        lines += [f"- **{name}** (seed {s}): {f['examples'][j]}" for name, s, f in finals]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_config_args(p, CONFIGS, "small")
    cli.add_methods_args(p, MAIN, (0,))
    p.add_argument("--beam", type=flags.integer(0), default=0, help="beam size for BLEU (default 0: greedy)")
    p.add_argument("--test-per-book", type=flags.integer(1), help="translate only the first N verses of each test book")
    p.add_argument("--val-bleu", action="store_true", help="also translate the validation books (BLEU)")
    cli.add_jobs_arg(p)
    p.add_argument("--runs-dir", default=None, help="default runs/translation_<config>")
    p.add_argument("--out", default=None, help="default <runs-dir>/report")
    p.add_argument("--cache-dir", default=None, help="data cache (default $SSTE_CACHE or ~/.cache/sste_jax)")
    args = p.parse_args(argv)
    runs_dir = pathlib.Path(args.runs_dir or f"runs/translation_{args.config}")
    out = pathlib.Path(args.out or runs_dir / "report")
    try:
        cfg = get_config(args.config, args.set)
        planned = plan(args.config, args.methods, args.seeds, args.set, runs_dir, recipe=args.recipe, beam=args.beam,
                       test_per_book=args.test_per_book, val_bleu=args.val_bleu, cache_dir=args.cache_dir)
    except ValueError as e:
        p.error(str(e))
    began = time.perf_counter()
    try:
        data = prepare_data(cfg, args.cache_dir or cache_dir_default())  # fills the caches the runs share
    except (ValueError, cache.CacheError) as e:
        sys.exit(f"error: {e}")
    print(describe(data, cfg.data.corpus), flush=True)
    try:
        runner.execute("experiments.translation.train", planned, args.jobs)
    except (loop.RunMismatchError, runner.RunsFailed) as e:
        sys.exit(f"error: {e}")
    runs = runner.load(planned)
    test = data.splits["test"]
    test_idx = first_per_book(test, args.test_per_book)
    books = ", ".join(dict.fromkeys(pair.book for pair in test.pairs))
    evaluated = (f"the first {args.test_per_book} verses of each test book ({len(test_idx)} of {len(test.pairs)})"
                 if args.test_per_book else f"all {len(test_idx)} test verses")
    decoding = f"beam {args.beam}" if args.beam else "greedy"
    command = "python -m experiments.translation.compare " + " ".join(argv if argv is not None else sys.argv[1:])
    m = cfg.model
    title = (f"### Spanish→English translation, config `{args.config}` ({m.n_layer}+{m.n_layer} layers, d "
             f"{m.d_model}), {cfg.optim.steps} steps, seeds {args.seeds}\n\nTest BLEU: sacrebleu, {decoding} decoding "
             f"of {evaluated} (books {books}). Command: `{command.strip()}`. Machine: {report.machine()}.\n\n"
             f"{describe(data, cfg.data.corpus)}.\n\n")
    text = table(summarize(runs)) + "".join(f"\n{line}." for line in switches(runs))
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(title + text + "\n")
    caption = f"{cfg.data.corpus}, config {args.config}, seeds {args.seeds} (band: seed range)"
    report.plot_curves(runs, "val_loss", out / "val_loss.png", "validation loss (2:4 weights)", title=caption)
    report.plot_curves(runs, "flip_rate", out / "flip_rate.png", "mask flip rate per step", log=True, title=caption)
    (out / "examples.md").write_text(f"# First test verses ({decoding} decoding)\n\n" + examples(runs, test, test_idx))
    print(title + text)
    print(f"wrote {out}/table.md, val_loss.png, flip_rate.png, examples.md in {time.perf_counter() - began:.0f} s")
    return title + text


if __name__ == "__main__":
    main()
