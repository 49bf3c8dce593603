"""train.profile (a jax.profiler trace of chosen steps) and train.dump_hlo (the compiled HLO)."""

import glob
import gzip
import json
import os

import pytest

from jaxlm.config import ConfigError, load_config
from jaxlm.train.loop import run
from jaxlm.utils.strict_yaml import yaml_load


@pytest.mark.parametrize("window", ["1:1", "2:3"])  # from the first step, and mid-run
def test_profile_window_and_hlo_dump(tmp_path, window):
    out = str(tmp_path / "run")
    run(load_config("tiny", [f"out_dir={out}", "train.steps=4", f"train.profile={window}",
                             "train.dump_hlo=true", "train.eval_batches=0", "ckpt.every=0"]))
    traces = glob.glob(os.path.join(out, "profile", "plugins", "profile", "*", "*.trace.json.gz"))
    assert len(traces) == 1 and glob.glob(os.path.join(os.path.dirname(traces[0]), "*.xplane.pb"))
    with gzip.open(traces[0]) as f:
        events = json.load(f)["traceEvents"]
    assert any("train_step" in str(e.get("name", "")) or "jit" in str(e.get("name", ""))
               for e in events), "the trace holds no step"
    hlo = open(os.path.join(out, "hlo", "train_step_8x64.txt")).read()
    assert hlo.startswith("HloModule") and "ENTRY" in hlo


def test_step_ranges_stay_strings_and_bad_ranges_are_one_line():
    assert yaml_load("5:7") == "5:7"  # YAML 1.1 would read the base-60 integer 307
    assert load_config(None, ["train.profile=5:7"]).train.profile == "5:7"
    for bad in ("7:5", "0:3", "5", "a:b"):
        with pytest.raises(ConfigError, match="START:STOP") as e:
            load_config(None, [f"train.profile={bad}"])
        assert "\n" not in str(e.value)
