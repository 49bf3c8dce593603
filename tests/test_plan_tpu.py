"""jaxlm-plan against the real TPU compiler: ahead-of-time compile for a v5e:4x4 topology on CPU.

Needs ``libtpu`` (``pip install -e ".[plan]"``; CI installs it into the 3.11 venv and runs this
file). Without it the TPU test skips with that reason; the CLI contract test still runs, on 16
fake CPU devices in a subprocess (the planner re-executes itself with the device-count flag).
"""

import importlib.util
import json

import pytest

from jaxlm.config import load_config
from jaxlm.plan.cli import main
from jaxlm.utils.flops import flops_per_token, param_count

HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None
TINY = ["model.vocab_size=256", "train.batch_size=16"]


@pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu not installed (pip install -e '.[plan]')")
def test_tpu_topology_compile_reports_the_compilers_memory_and_exact_flops():
    from jaxlm.plan.compile import compile_train_step, memory_analysis, tpu_devices
    from jaxlm.plan.planner import plan
    from jaxlm.plan.targets import parse_target

    target = parse_target("v5e-16")
    devices = tpu_devices(target.tpu_topology, 1, target.chip.node)
    assert len(devices) == 16 and devices[0].platform == "tpu"
    cfg = load_config("tiny", TINY + ["mesh.fsdp=8", "mesh.tensor=2"])
    p = plan(cfg, target)
    assert p["source"] == "compiled-tpu" and p["fits"]
    # the memory figures are XLA's own for this program, per chip
    again = memory_analysis(compile_train_step(cfg, devices).compiled)
    mem = p["memory_per_chip_bytes"]
    assert mem["total"] == again["total"] and mem["temp"] == again["temp"] > 0
    assert mem["arguments"] >= mem["params"] + mem["optimizer"]
    # FLOPs with the layer loop's trip count (read from its condition: TPU HLO omits
    # known_trip_count) = the PaLM formula for the whole step, all chips
    assert p["flops_per_step"] == flops_per_token(cfg.model, 256, 64) * 16 * 64
    assert p["model"]["params"] == param_count(cfg.model, 256)
    axes = {tuple(c["mesh_axes"]) for c in p["collectives"] if c["bytes"] >= 1024}
    assert ("fsdp",) in axes and ("tensor",) in axes and ("?",) not in axes


def test_cli_v5e16_json_contract(capfd):
    argv = ["tiny", *TINY, "--target", "v5e-16", "--mesh", "fsdp=16", "--json"]
    assert main(argv) == 0
    p = json.loads(capfd.readouterr().out)
    assert p["target"] == "v5e-16" and p["chips"] == 16
    assert p["source"] == ("compiled-tpu" if HAVE_LIBTPU else "compiled-fake-devices")
    assert p["fits"] is True and p["hbm_per_chip_bytes"] == 16 * 1024**3
    assert {"params", "optimizer", "temp", "total"} <= set(p["memory_per_chip_bytes"])
    assert p["collectives"] and all(c["mesh_axes"] == ["fsdp"] for c in p["collectives"])
    assert p["step_time_s_estimate"] > 0 and p["tokens_per_s_estimate"] > 0
    assert 0 < p["mfu_estimate"] < 1


@pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu not installed (pip install -e '.[plan]')")
def test_two_slices_put_data_on_the_datacenter_network():
    from jaxlm.plan.planner import plan
    from jaxlm.plan.targets import parse_target

    target = parse_target("2x v5e-4")
    p = plan(load_config("tiny", TINY + ["mesh.data=2", "mesh.fsdp=4"]), target)
    assert p["source"] == "compiled-tpu" and p["chips"] == 8
    data = [c for c in p["collectives"] if c["mesh_axes"] == ["data"]]
    assert len(data) == 1 and data[0]["bytes"] == p["memory_per_chip_bytes"]["params"]
    # it crosses slices: an all-reduce (2 x (n-1)/n of the bytes, n = 2) at the DCN bandwidth
    assert data[0]["time_s"] == pytest.approx(data[0]["bytes"] / target.chip.dcn_bw, rel=1e-6)
