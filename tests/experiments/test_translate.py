import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.common import report, runner
from experiments.common.config import override
from experiments.common.records import read_records
from experiments.translation import compare, train
from experiments.translation import model as seq2seq
from experiments.translation.configs import CONFIGS, STEP_RECIPE, TranslationData, get_config
from experiments.translation.model import PAD

METHODS = ("dense", "srste", "step", "sste")
SPARSE = ("srste", "step", "sste")
FORCE_SWITCH = ("switch_threshold=0", "switch_min=0.125", "switch_max=0.125")  # t > 1: STEP switches after step 2 of 8


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def data(cache):
    tiny = CONFIGS["tiny"]
    two_buckets = dataclasses.replace(tiny, data=dataclasses.replace(tiny.data, bucket_percentiles=(50.0, 100.0)))
    return train.prepare_data(two_buckets, cache)


@pytest.fixture(scope="module")
def compared(tmp_path_factory, cache):
    """The four methods trained in-process where `compare` plans them, then `compare.main`, which finds
    them finished and only reports (no subprocess)."""
    runs_dir = tmp_path_factory.mktemp("compare") / "runs"
    planned = compare.plan("tiny", METHODS, [0], [], runs_dir, recipe=FORCE_SWITCH, val_bleu=True, cache_dir=cache)
    shared = train.prepare_data(planned[0].run.config, cache)
    states = {p.name: train.train(p.run, p.workdir, data=shared, progress=False) for p in planned}

    def no_jobs(jobs, *args, **kwargs):
        assert not jobs, [j.name for j in jobs]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "run_jobs", no_jobs)
        text = compare.main(["--config", "tiny", "--methods", *METHODS, "--recipe", *FORCE_SWITCH, "--val-bleu",
                             "--runs-dir", str(runs_dir), "--cache-dir", str(cache)])
    return {"runs_dir": runs_dir, "planned": planned, "states": states, "text": text}


def test_configs_keep_their_numbers_and_validate_the_data_part():
    tiny, small = CONFIGS["tiny"], CONFIGS["small"]
    assert (tiny.model.n_layer, tiny.model.n_head, tiny.model.d_model, tiny.model.seq_len) == (1, 2, 32, 32)
    assert (tiny.data.corpus, tiny.data.vocab_size, tiny.data.bucket_percentiles) == ("synthetic", 400, (100.0,))
    assert (small.model.n_layer, small.model.d_model, small.model.seq_len) == (3, 128, 128)
    assert (small.data.corpus, small.data.vocab_size) == ("bible", 8000)
    assert (small.optim.steps, small.optim.lr, small.optim.b2, small.loop.eval_every) == (800, 2e-3, 0.999, 100)
    assert get_config("tiny", ["corpus=bible", "eval_batch_size=8"]).data == TranslationData("bible", 400, (100.0,), 8)
    for bad, field in (("corpus=wiki", "corpus='wiki'"), ("vocab_size=100", "vocab_size=100"),
                       ("eval_batch_size=0", "eval_batch_size=0")):
        with pytest.raises(ValueError, match=field):
            get_config("tiny", [bad])
    with pytest.raises(ValueError, match="bucket_percentiles"):
        TranslationData(bucket_percentiles=(50.0, 101.0))


def test_step_runs_start_from_the_translation_switch_settings():
    cfg = CONFIGS["tiny"]
    assert dict(train.make_run(cfg, "step").recipe_changes) == STEP_RECIPE
    assert dict(train.make_run(cfg, "step", recipe_changes=[("switch_min", 0.3)]).recipe_changes) == {
        **STEP_RECIPE, "switch_min": 0.3}
    assert train.make_run(cfg, "sste").recipe_changes == ()
    assert dict(train.make_run(cfg, "sste", beam=4, test_per_book=2).options) == {
        "beam": 4, "test_per_book": 2, "val_bleu": False}
    with pytest.raises(ValueError, match="test_per_book=0"):
        train.make_run(cfg, "sste", test_per_book=0)


def test_batches_are_bucketed_and_a_function_of_seed_and_step(data):
    assert len(data.widths) == 2 and data.widths[-1] == data.max_len
    assert sum(len(b) for b in data.train_buckets) == len(data.splits["train"].pairs)
    src, tgt_in, tgt_out = train.batch_at(data, step=3, batch_size=16, seed=0)
    assert src.shape[:2] == (1, 16) and src.shape == tgt_in.shape == tgt_out.shape and src.shape[2] in data.widths
    np.testing.assert_array_equal(train.batch_at(data, 3, 16, 0)[0], src)
    widths = {train.batch_at(data, step, 16, 0)[0].shape[2] for step in range(20)}
    assert widths == set(data.widths)  # both buckets get drawn
    assert not np.array_equal(train.batch_at(data, 3, 16, 1)[0], src)
    eos = data.tokenizer.eos_id  # every row keeps its <eos>: cut only where it is padding
    assert ((src == eos).sum(-1) == 1).all() and ((tgt_out == eos).sum(-1) == 1).all()
    src_AxBxW = train.batch_at(data, 3, 16, 0, grad_accum=2)[0]  # micro-batches: one bucket, distinct pairs
    assert src_AxBxW.shape[:2] == (2, 16) and len({r.tobytes() for r in src_AxBxW.reshape(32, -1)}) == 32


def test_eval_batches_cover_the_split_once(data):
    val = data.splits["val"]
    batches = train.eval_batches(val, data.widths, batch_size=24)
    assert {b[0].shape for b in batches} == {(24, w) for w in data.widths}
    assert sum(int((b[2] != PAD).sum()) for b in batches) == int((val.tgt_out != PAD).sum())
    # the token-weighted mean over bucketed batches equals the loss of the whole split at full width
    cfg = seq2seq.Seq2SeqConfig(data.tokenizer.vocab_size, 16, 2, 1, 1, max_len=data.max_len)
    model = seq2seq.Transformer(cfg, rngs=nnx.Rngs(0))
    loss = train.validation_loss(model, batches)
    whole = nnx.jit(train.translation_loss)(model, *(jnp.asarray(a) for a in (val.src, val.tgt_in, val.tgt_out)))
    np.testing.assert_allclose(loss, float(whole), rtol=1e-5)


def test_first_per_book_and_small_buckets_are_reported(data, cache):
    test = data.splits["test"]
    idx = train.first_per_book(test, 3)
    assert [test.pairs[i].verse for i in idx] == [1, 2, 3]  # one test book
    assert len(train.first_per_book(test, None)) == len(test.pairs)
    with pytest.raises(ValueError, match="batch_size=5000"):
        train.prepare_data(override(CONFIGS["tiny"], ["batch_size=5000"]), cache)
    assert "dropped, not truncated" in train.describe(data, "synthetic")


@pytest.mark.integration
def test_tiny_end_to_end_per_method(compared):
    runs_dir, text = compared["runs_dir"], compared["text"]
    runs = runner.load(compared["planned"])
    assert list(runs) == list(METHODS)
    for method in METHODS:
        records = runs[method][0]
        f = report.final_record(records)
        assert 0.0 <= f["test_bleu"] <= 100.0 and 0.0 <= f["val_bleu"] <= 100.0 and f["n_test"] == 200
        assert np.isfinite(f["train_loss"]) and np.isfinite(f["val_loss"]) and len(f["examples"]) == 5
        logs = [r for r in records if r["kind"] == "train"]
        assert [r["step"] for r in logs] == [4, 8] and all(np.isfinite(r["flip_rate"]) for r in logs)
        assert [(r["step"], "val_loss" in r) for r in records if r["kind"] == "eval"] == [(8, True)]
        zeros = {k: v for k, v in f.items() if k.startswith("zero_fraction/")}
        assert sorted(zeros) == [f"zero_fraction/{side}/0/mlp/{fc}/kernel" for side in ("decoder", "encoder")
                                 for fc in ("fc1", "fc2")]
        assert all(v == (0.5 if method in SPARSE else 0.0) for v in zeros.values()), zeros
    step_logs = [r for r in runs["step"][0] if r["kind"] == "train"]
    assert [r["phase"] for r in step_logs] == [0.5, 1.0] and all("step_v_change" in r for r in step_logs)
    assert report.final_record(runs["step"][0])["second_phase_from"] == 3
    assert "step seed 0: second phase from step 3 of 8" in text
    assert all(f"| {m} |" in text for m in METHODS) and "all 200 test verses" in text
    assert "− dense (95% CI)" not in text  # one seed: no interval
    out = runs_dir / "report"
    assert (out / "table.md").read_text().startswith("### Spanish→English translation, config `tiny`")
    assert (out / "val_loss.png").stat().st_size > 0 and (out / "flip_rate.png").stat().st_size > 0
    assert (out / "examples.md").read_text().count("- **sste** (seed 0):") == 5


@pytest.mark.integration
def test_resumed_run_ends_bit_identical_to_a_straight_run(compared, cache, tmp_path):
    straight = next(p for p in compared["planned"] if p.name == "step")
    workdir = tmp_path / "split"
    # the per-run CLI, stopped right after the switch; then the rest in-process
    train.main(["--config", "tiny", "--method", "step", "--recipe", *FORCE_SWITCH, "--val-bleu", "--until", "2",
                "--workdir", str(workdir), "--cache-dir", str(cache), "--quiet"])
    assert not any(r["kind"] == "final" for r in read_records(workdir / "metrics.jsonl"))
    state = train.train(straight.run, workdir, resume=True, cache_dir=cache, progress=False)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(compared["states"]["step"]))
    ends = [[r for r in read_records(w / "metrics.jsonl") if r["kind"] != "train" or r["step"] == 8]
            for w in (workdir, straight.workdir)]
    timing = ("seconds", "decode_seconds", "steps_per_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in ends[0]] == \
           [{k: v for k, v in r.items() if k not in timing} for r in ends[1]]


@pytest.mark.integration
def test_unknown_method_setting_or_other_run_is_rejected(compared, cache, tmp_path, capsys):
    base = ["--config", "tiny", "--workdir", str(tmp_path / "w"), "--cache-dir", str(cache), "--quiet"]
    with pytest.raises(SystemExit):
        train.main([*base, "--method", "bogus"])
    for bad in (["--set", "bogus=1"], ["--recipe", "bogus=1"]):  # flags' values: tests/experiments/test_flags.py
        with pytest.raises(SystemExit, match="bogus"):
            train.main([*base, *bad])
    with pytest.raises(SystemExit):
        compare.main(["--config", "tiny", "--methods", "dense", "bogus", "--runs-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        compare.main(["--config", "tiny", "--set", "bogus=1", "--runs-dir", str(tmp_path)])
    assert "bogus" in capsys.readouterr().err
    dense = compared["runs_dir"] / "dense_s0"  # a folder holding the same method with other settings
    with pytest.raises(SystemExit, match=r"other settings.*optim\.lr"):
        train.main(["--config", "tiny", "--method", "dense", "--recipe", *FORCE_SWITCH, "--val-bleu",
                    "--set", "lr=1e-3", "--workdir", str(dense), "--cache-dir", str(cache), "--quiet", "--resume"])


def test_table_pairs_differences_by_seed():
    def row(bleu, loss):
        return {"train_loss": [3.0, 3.0], "val_loss": loss, "test_bleu": bleu, "seconds": [1.0, 1.0]}

    summary = {"dense": row([10.0, 11.0], [3.60, 3.70]), "srste": row([10.5, 11.0], [3.61, 3.70]),
               "step": row([9.0, 11.5], [3.62, 3.71]), "sste": row([11.0, 12.0], [3.58, 3.69])}
    for name, r in summary.items():
        for key in ("val_loss", "test_bleu"):
            r[f"{key}_gap"] = [v - d for v, d in zip(r[key], summary["dense"][key])]
    text = compare.table(summary)
    # sste − srste test BLEU per seed 0.5, 1.0: mean 0.75, half-width 12.706 x 0.3536 / sqrt(2) = 3.18
    assert "| sste − srste | +0.75 [-2.43, +3.93] | +0.50, +1.00 |" in text
    assert "| sste − step | +1.25 [-8.28, +10.78] | +2.00, +0.50 |" in text
    assert "| step − srste |" in text and "| difference (test BLEU) |" in text
    one_seed = {name: {k: v[:1] for k, v in r.items() if not k.endswith("_gap")} for name, r in summary.items()}
    assert "| difference" not in compare.table(one_seed)

