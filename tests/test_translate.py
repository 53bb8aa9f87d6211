import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import seq2seq, translate
from experiments.seq2seq import PAD

SPARSE = ("srste", "step", "sste")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tcfg = dataclasses.replace(translate.CONFIGS["tiny"], bucket_percentiles=(50.0, 100.0))
    return translate.prepare_data(tcfg, "synthetic", tmp_path_factory.mktemp("cache"))


def test_batches_are_bucketed_and_a_function_of_seed_and_step(data):
    assert len(data.widths) == 2 and data.widths[-1] == data.max_len
    assert sum(len(b) for b in data.train_buckets) == len(data.splits["train"].pairs)
    src, tgt_in, tgt_out = translate.batch_at(data, step=3, batch_size=16, seed=0)
    assert src.shape[:2] == (1, 16) and src.shape == tgt_in.shape == tgt_out.shape and src.shape[2] in data.widths
    np.testing.assert_array_equal(translate.batch_at(data, 3, 16, 0)[0], src)
    widths = {translate.batch_at(data, step, 16, 0)[0].shape[2] for step in range(20)}
    assert widths == set(data.widths)  # both buckets get drawn
    assert not np.array_equal(translate.batch_at(data, 3, 16, 1)[0], src)
    eos = data.tokenizer.eos_id  # every row keeps its <eos>: cut only where it is padding
    assert ((src == eos).sum(-1) == 1).all() and ((tgt_out == eos).sum(-1) == 1).all()


def test_eval_batches_cover_the_split_once(data):
    val = data.splits["val"]
    batches = translate.eval_batches(val, data.widths, batch_size=24)
    assert {b[0].shape for b in batches} == {(24, w) for w in data.widths}
    assert sum(int((b[2] != PAD).sum()) for b in batches) == int((val.tgt_out != PAD).sum())
    # the token-weighted mean over bucketed batches equals the loss of the whole split at full width
    cfg = seq2seq.Seq2SeqConfig(data.tokenizer.vocab_size, 16, 2, 1, 1, max_len=data.max_len)
    model = seq2seq.Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = translate.validation_loss(translate.make_eval(graphdef), {"params": params, "rest": rest}, batches)
    whole = nnx.jit(translate.translation_loss)(model, *(jnp.asarray(a) for a in (val.src, val.tgt_in, val.tgt_out)))
    np.testing.assert_allclose(loss, float(whole), rtol=1e-5)


def test_first_per_book_and_small_buckets_are_reported(data, tmp_path):
    test = data.splits["test"]
    idx = translate.first_per_book(test, 3)
    assert [test.pairs[i].verse for i in idx] == [1, 2, 3]  # one test book
    assert len(translate.first_per_book(test, None)) == len(test.pairs)
    too_big = dataclasses.replace(translate.CONFIGS["tiny"], train=dataclasses.replace(
        translate.CONFIGS["tiny"].train, batch_size=5000))
    with pytest.raises(ValueError, match="batch_size=5000"):
        translate.prepare_data(too_big, "synthetic", tmp_path)


def test_tiny_end_to_end_per_method(tmp_path):
    # STEP is forced to switch after step 2 of 8 (the recipe changes apply to every method)
    out = tmp_path / "out"
    finals = translate.main(["--config", "tiny", "--methods", "dense,srste,step,sste", "--val-bleu",
                             "--recipe", "switch_threshold=0", "switch_min=0.125", "switch_max=0.25",
                             "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    assert [f["method"] for f in finals] == ["dense", "srste", "step", "sste"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for f in finals:
        assert 0.0 <= f["test_bleu"] <= 100.0 and 0.0 <= f["val_bleu"] <= 100.0 and f["n_test"] == 200
        assert np.isfinite(f["train_loss"]) and np.isfinite(f["val_loss"]) and len(f["examples"]) == 5
        logs = [r for r in records if r["method"] == f["method"] and not r.get("final")]
        assert [r["step"] for r in logs] == [4, 8] and "val_loss" in logs[-1]
        assert all(np.isfinite(r["flip_rate"]) for r in logs)
        zeros = {k: v for k, v in f.items() if k.startswith("zero_fraction/")}
        assert sorted(zeros) == [f"zero_fraction/{side}/0/mlp/{fc}" for side in ("decoder", "encoder")
                                 for fc in ("fc1", "fc2")]
        assert all(v == (0.5 if f["method"] in SPARSE else 0.0) for v in zeros.values()), zeros
    table = (out / "table.md").read_text()
    step_logs = [r for r in records if r["method"] == "step" and not r.get("final")]
    assert step_logs[0]["phase"] == 0.5 and step_logs[1]["phase"] == 1.0 and finals[2]["phase"] == 1
    assert finals[2]["second_phase_from"] == 3 and "step seed 0: second phase from step 3 of 8" in table
    assert all("step_v_change" in r for r in step_logs)
    assert all(f"| {m} |" in table for m in ("dense", "srste", "step", "sste")) and "all 200 test verses" in table
    assert (out / "val_loss.png").stat().st_size > 0 and (out / "flip_rate.png").stat().st_size > 0
    assert (out / "examples.md").read_text().count("- **sste** (seed 0):") == 5


def test_unknown_method_or_setting_is_rejected(tmp_path):
    with pytest.raises(SystemExit):
        translate.main(["--config", "tiny", "--methods", "dense,bogus", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="bogus=1"):
        translate.main(["--config", "tiny", "--set", "bogus=1", "--out", str(tmp_path)])
