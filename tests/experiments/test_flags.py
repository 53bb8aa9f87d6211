"""Every command's flags are checked when its command line is parsed: a bad value exits with status 2
and the rule it broke, before anything starts."""

import subprocess
import sys

import pytest

from experiments import ablate, launch
from experiments.lm import agreement, export_hf, nm, sample, scaling, sweep
from experiments.lm import compare as lm_compare
from experiments.lm import train as lm_train
from experiments.translation import compare as translation_compare
from experiments.translation import train as translation_train
from experiments.vision import compare as vision_compare
from experiments.vision import train as vision_train

RUN = ["--workdir", "unused"]
LAUNCH = ["--processes", "2"]
BAD_FLAGS = [
    (launch.main, [*LAUNCH, "--grace", "-1", "--", "true"], "--grace: '-1': must be a finite number >= 0"),
    (launch.main, [*LAUNCH, "--grace", "nan", "--", "true"], "--grace: 'nan': must be a finite number"),
    (launch.main, [*LAUNCH, "--grace", "inf", "--", "true"], "--grace: 'inf': must be a finite number"),
    (launch.main, [*LAUNCH, "--local-devices", "0", "--", "true"], "--local-devices: '0': must be an integer"),
    (launch.main, [*LAUNCH, "--local-devices", "-2", "--", "true"], "--local-devices: '-2': must be an integer"),
    (launch.main, ["--processes", "0", "--", "true"], "--processes: '0': must be an integer >= 1"),
    (launch.main, ["--processes", "1.5", "--", "true"], "--processes: '1.5': must be an integer >= 1"),
    (lm_train.main, [*RUN, "--seed", "-1"], "--seed: '-1': must be an integer >= 0"),
    (lm_train.main, [*RUN, "--until", "0"], "--until: '0': must be an integer >= 1"),
    (lm_train.main, [*RUN, "--sparse-lr-scale", "nan"], "--sparse-lr-scale: 'nan': must be a finite number > 0"),
    (lm_train.main, [*RUN, "--sparse-lr-scale", "0"], "--sparse-lr-scale: '0': must be a finite number > 0"),
    (lm_train.main, [*RUN, "--local-devices", "0"], "--local-devices: '0': must be an integer >= 1"),
    (lm_train.main, [*RUN, "--num-processes", "-2"], "--num-processes: '-2': must be an integer >= 1"),
    (lm_train.main, [*RUN, "--process-id", "-1"], "--process-id: '-1': must be an integer >= 0"),
    (lm_train.main, [*RUN, "--mesh", "data=0"], "--mesh: --mesh 'data=0': expected data=D,fsdp=F"),
    (vision_train.main, [*RUN, "--seed", "x"], "--seed: 'x': must be an integer >= 0"),
    (translation_train.main, [*RUN, "--beam", "-1"], "--beam: '-1': must be an integer >= 0"),
    (translation_train.main, [*RUN, "--test-per-book", "0"], "--test-per-book: '0': must be an integer >= 1"),
    (export_hf.main, [*RUN, "--out", "x", "--format", "csr"], "--format: invalid choice: 'csr'"),
    (export_hf.main, [*RUN, "--out", "x", "--format", "dense", "--fp8", "channel"], "--format dense stores no 2:4"),
    (sample.main, [*RUN, "--tokens", "0"], "--tokens: '0': must be an integer >= 1"),
    (sample.main, [*RUN, "--temperature", "-0.5"], "--temperature: '-0.5': must be a finite number >= 0"),
    (sample.main, [*RUN, "--temperature", "inf"], "--temperature: 'inf': must be a finite number >= 0"),
    (sample.main, [*RUN, "--top-k", "-1"], "--top-k: '-1': must be an integer >= 0"),
    (sample.main, [*RUN, "--backend", "xla"], "--backend applies to compressed 2:4 layers"),
    (agreement.main, [*RUN, "--tokens", "-3"], "--tokens: '-3': must be an integer >= 1"),
    (lm_compare.main, ["--jobs", "0"], "--jobs: '0': must be an integer >= 1"),
    (lm_compare.main, ["--seeds", "0", "-1"], "--seeds: '-1': must be an integer >= 0"),
    (lm_compare.main, ["--lr", "srste"], "--lr: 'srste': expected METHOD=RATE with METHOD one of"),
    (lm_compare.main, ["--lr", "sstee=0.01"], "--lr: 'sstee=0.01': expected METHOD=RATE"),
    (lm_compare.main, ["--lr", "sste=-1"], "--lr: 'sste=-1': the rate '-1': must be a finite number > 0"),
    (lm_compare.main, ["--lr", "sste=0.01", "sste=0.02"], "--lr: a method is given twice"),
    (lm_compare.main, ["--methods", "dense", "--lr", "sste=0.01"], "--lr sste: not among --methods"),
    (lm_compare.main, ["--lr", "sste=0.01", "--set", "lr=0.01"], "--lr and --set lr=... both set rates: use one"),
    (vision_compare.main, ["--jobs", "-1"], "--jobs: '-1': must be an integer >= 1"),
    (translation_compare.main, ["--beam", "nan"], "--beam: 'nan': must be an integer >= 0"),
    (sweep.main, ["--lrs", "1e-3", "nan", "3e-3"], "--lrs: 'nan': must be a finite number > 0"),
    (sweep.main, ["--lrs", "1e-3", "-0.002", "3e-3"], "--lrs: '-0.002': must be a finite number > 0"),
    (sweep.main, ["--extend", "-1"], "--extend: '-1': must be an integer >= 0"),
    (sweep.main, ["--final-seeds", "a"], "--final-seeds: 'a': must be an integer >= 0"),
    (nm.main, ["--patterns", "4:2"], "--patterns: pattern '4:2': expected N:M with 0 < N < M"),
    (scaling.main, ["--steps", "0"], "--steps: '0': must be an integer >= 1"),
    (ablate.main, ["--task", "lm", "--seeds", "-1"], "--seeds: '-1': must be an integer >= 0"),
    (ablate.main, ["--task", "vision", "--refit-every", "0"], "--refit-every: '0': must be an integer >= 1"),
]


@pytest.mark.parametrize("main, argv, message", BAD_FLAGS, ids=[f"{m.__module__}{a}" for m, a, _ in BAD_FLAGS])
def test_a_bad_flag_exits_at_parse_time_naming_the_flag_and_the_rule(main, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.integration
def test_launch_with_a_bad_grace_starts_no_process(tmp_path):
    marker = tmp_path / "started"
    cmd = [sys.executable, "-m", "experiments.launch", "--processes", "2", "--grace", "-1", "--",
           sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--grace: '-1': must be a finite number >= 0" in result.stderr
    assert not marker.exists()
