"""Every file a run reads (run.json, metrics.jsonl) fails, when damaged, with an error naming the file
and what is wrong with it, through the real commands."""

import json
import re
import shutil

import pytest

from experiments.lm import export_hf, sample
from experiments.lm import train as lm_train

pytestmark = pytest.mark.integration  # every test reads a run the module trains

TINY = ["--config", "tiny", "--set", "steps=2", "warmup=1", "ckpt_every=2", "eval_every=2", "log_every=1",
        "--method", "sste", "--quiet"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    lm_train.main([*TINY, "--workdir", str(root / "run"), "--cache-dir", str(root / "cache")])
    return root


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the trained run, and the arguments that resume it."""
    workdir = shutil.copytree(trained / "run", tmp_path / "run")
    return workdir, [*TINY, "--workdir", str(workdir), "--cache-dir", str(trained / "cache"), "--resume"]


def _identity_with(**changes) -> bytes:
    return json.dumps({"identity": {"task": "lm", "method": "sste", "seed": 0, "config": {}, "recipe": {},
                                    "options": {}, "sparse_lr_scale": 1.0, **changes}}).encode()


RUN_JSON_FAULTS = [
    (b"", "is empty"),
    (b"{", "line 1 column 2: not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8 text"),
    (b"[]", "no 'identity' object"),
    (b'{"identity": {"task": "lm"}}', "identity.method is missing"),
    (_identity_with(seed="0"), "identity.seed is '0', not of type int"),
    (_identity_with(config={"model": {}, "optim": {}}), "identity.config.loop is None, not an object"),
]


@pytest.mark.parametrize("content, why", RUN_JSON_FAULTS, ids=[w for _, w in RUN_JSON_FAULTS])
def test_a_damaged_run_json_is_named_on_resume(run, content, why):
    workdir, resume = run
    (workdir / "run.json").write_bytes(content)
    with pytest.raises(SystemExit, match=re.escape(f"{workdir / 'run.json'}") + ".*" + re.escape(why)):
        lm_train.main(resume)


def test_a_run_json_of_the_wrong_shape_is_named_by_sample_and_export(run, tmp_path):
    workdir, _ = run
    info = json.loads((workdir / "run.json").read_text())
    info["identity"]["config"]["model"]["n_head"] = "two"
    (workdir / "run.json").write_text(json.dumps(info))
    named = re.escape(f"{workdir / 'run.json'}: not the identity of a language-model run")
    with pytest.raises(SystemExit, match=named):
        sample.main(["--workdir", str(workdir), "--tokens", "2"])
    with pytest.raises(SystemExit, match=named):
        export_hf.main(["--workdir", str(workdir), "--out", str(tmp_path / "hf")])
    assert not (tmp_path / "hf").exists()


def test_init_from_a_run_without_run_json_is_named(run, tmp_path):
    workdir, _ = run
    (workdir / "run.json").unlink()
    fresh = [*TINY, "--workdir", str(tmp_path / "new"), "--init-from", str(workdir), "--cache-dir", str(tmp_path)]
    missing = f"{workdir} is not a training run: {workdir / 'run.json'} is missing"
    with pytest.raises(SystemExit, match=re.escape(missing)):
        lm_train.main(fresh)


METRICS_FAULTS = [
    ("[1, 2]\n", "line 1: not a metrics record: a JSON list, not a record object"),
    ('{"method": "sste", "seed": 0, "kind": "train"}\n', "line 1: not a metrics record: it has no step"),
    ('{"method": "sste", "seed": 0, "step": 1, "kind": "oops"}\n', "line 1: not a metrics record: its kind is 'oops'"),
    ("{not json\n", "line 1: not a JSON record"),
]


@pytest.mark.parametrize("line, why", METRICS_FAULTS, ids=[w for _, w in METRICS_FAULTS])
def test_a_damaged_metrics_file_is_named_on_resume(run, line, why):
    workdir, resume = run
    metrics = workdir / "metrics.jsonl"
    metrics.write_text(line + metrics.read_text())
    with pytest.raises(SystemExit, match=re.escape(f"{metrics}, {why}")):
        lm_train.main(resume)
