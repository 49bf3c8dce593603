"""jaxlm-plan (issue #17) on fake CPU devices: state bytes, HLO FLOPs and collectives, the CLI.

Independent references: the real sharded state's bytes on each device (``addressable_shards``),
the PaLM FLOP formula (:func:`jaxlm.utils.flops.flops_per_token`), the parameter count formula,
and :func:`jaxlm.utils.inspect.count_collectives` (a separate regex over the same HLO).
"""

import json

import jax
import pytest

from jaxlm.config import ConfigError, load_config
from jaxlm.plan import estimate, hlo, planner
from jaxlm.plan.cli import main, mesh_overrides, run
from jaxlm.plan.compile import build_spec, compile_train_step
from jaxlm.plan.targets import parse_target
from jaxlm.utils.flops import flops_per_token, param_count
from jaxlm.utils.inspect import bytes_per_device, count_collectives

TINY = ["model.vocab_size=256"]


def _cfg(*extra):
    return load_config("tiny", TINY + list(extra))


def test_state_bytes_equal_the_real_sharded_state():
    cfg = _cfg("mesh.fsdp=4", "mesh.tensor=2")
    spec = build_spec(cfg, jax.devices()[:8])
    state = spec.init()
    want_params = set(bytes_per_device(state["params"]).values())
    want_opt = set(bytes_per_device(state["opt_state"]).values())
    got = estimate.state_bytes(spec)
    assert want_params == {got["params"]} and want_opt == {got["optimizer"]}
    # the device-free path (AbstractMesh) gives the same, and the total is the formula's
    abstract = estimate.state_bytes(planner.abstract_spec(cfg, 8))
    assert abstract["params"] == got["params"] and abstract["optimizer"] == got["optimizer"]
    one = estimate.state_bytes(planner.abstract_spec(_cfg("mesh.fsdp=1"), 1))
    assert one["params"] == 4 * param_count(cfg.model, 256)
    # AdamW: two float32 moments per parameter (+ a few scalars: step count, schedule)
    assert 0 <= one["optimizer"] - 2 * one["params"] < 64


def test_fsdp4_flops_and_collectives_match_the_compiled_hlo():
    cfg = _cfg("mesh.fsdp=4")
    out = compile_train_step(cfg, jax.devices()[:4])
    text = out.compiled.as_text()
    a = hlo.analyze(text, dict(out.spec.mesh.shape))
    assert a.unknown_trip_counts == 0
    # FLOPs with the layer scan's trip count applied = the PaLM formula, per chip (remat none)
    assert a.flops == flops_per_token(cfg.model, 256, 64) * 8 * 64 / 4
    # every collective is over fsdp, and each op of the HLO is in the list
    assert {tuple(c.mesh_axes) for c in a.collectives} == {("fsdp",)}
    assert {c.op for c in a.collectives} == {k for k, v in count_collectives(text).items() if v}
    # each gradient is reduced over fsdp exactly once: the reduced bytes are all the params'
    reduced = sum(c.bytes * c.count for c in a.collectives
                  if c.op in ("all-reduce", "reduce-scatter"))
    assert reduced == pytest.approx(4 * param_count(cfg.model, 256), rel=1e-3)
    # weights are gathered: at least the layers' fsdp-sharded bytes come in per step
    gathered = sum(c.bytes * c.count for c in a.collectives if c.op == "all-gather")
    assert gathered >= 4 * 2 * (4 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128) * 3 / 4


def test_tensor2_fsdp2_collectives_match_the_compiled_hlo():
    cfg = _cfg("mesh.fsdp=2", "mesh.tensor=2", "model.scan_layers=false")
    out = compile_train_step(cfg, jax.devices()[:4])
    text = out.compiled.as_text()
    a = hlo.analyze(text, dict(out.spec.mesh.shape))
    counts = {}
    for c in a.collectives:
        counts[c.op] = counts.get(c.op, 0) + c.count
    # no loops: the planner's occurrences are the HLO's instructions, op by op
    assert counts == {k: v for k, v in count_collectives(text).items() if v}
    assert a.flops == flops_per_token(cfg.model, 256, 64) * 8 * 64 / 4
    axes = {(c.op, tuple(c.mesh_axes)) for c in a.collectives if c.bytes * c.count >= 1024}
    assert ("all-gather", ("fsdp",)) in axes  # FSDP weight gathers
    assert ("all-reduce", ("tensor",)) in axes  # row-parallel matmul outputs
    assert not any(op == "all-gather" and "tensor" in ax for op, ax in axes)
    # activation all-reduces over tensor carry [rows, T, D] float32 blocks: 4 rows per chip
    sizes = {c.bytes for c in a.collectives if c.mesh_axes == ["tensor"]}
    assert 4 * 64 * 64 * 4 in sizes


def test_replica_group_forms_decode_to_the_same_groups():
    shape = {"data": 1, "fsdp": 2, "tensor": 2}
    forms = ["replica_groups={{0,2},{1,3}}", "replica_groups=[2,2]<=[2,2]T(1,0)",
             "replica_groups=mesh['axis_0'=1,'axis_1'=2,'axis_2'=2] {'axis_1'}"]
    for attrs in forms:
        groups = hlo.decode_groups(attrs)
        assert sorted(map(sorted, groups)) == [[0, 2], [1, 3]], attrs
        assert hlo.group_axes(groups, shape) == (["fsdp"], 2)
    tensor = hlo.decode_groups("replica_groups=[2,2]<=[4]")
    assert hlo.group_axes(tensor, shape) == (["tensor"], 2)


def test_targets_parse_with_their_topologies():
    assert parse_target("v5e-256").tpu_topology == "v5e:16x16"
    assert parse_target("v5p-128").tpu_topology == "v5p:4x4x8"
    two = parse_target("2x v5e-256")
    assert (two.n_chips, two.n_slices, two.per_slice) == (512, 2, 256)
    h = parse_target("h100x64")
    assert (h.n_chips, h.chip.peak_flops, h.chip.hbm_bytes) == (64, 989e12, 80e9)
    # NVLink inside a node, InfiniBand across nodes
    assert h.axis_bandwidth(["tensor"], {"data": 1, "fsdp": 8, "tensor": 8}) == h.chip.ici_bw
    assert h.axis_bandwidth(["fsdp"], {"data": 1, "fsdp": 8, "tensor": 8}) == h.chip.dcn_bw
    for bad in ("v5e-3", "tpu-8", "h100x12", "v5p-100"):
        with pytest.raises(ConfigError):
            parse_target(bad)


def test_cli_json_contract_and_one_line_errors(capsys):
    assert main(["tiny", "model.vocab_size=256", "--target", "h100x8", "--mesh", "fsdp=8",
                 "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    for key in ("target", "source", "fits", "memory_per_chip_bytes", "hbm_per_chip_bytes",
                "flops_per_step", "collectives", "step_time_s_estimate",
                "tokens_per_s_estimate", "mfu_estimate"):
        assert key in p, key
    assert p["source"] == "compiled-fake-devices" and p["fits"] is True
    assert {"params", "optimizer", "temp", "total"} <= set(p["memory_per_chip_bytes"])
    assert all({"op", "mesh_axes", "bytes"} <= set(c) for c in p["collectives"])
    assert p["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert 0 < p["mfu_estimate"] < 1 and p["step_time_s_estimate"] > 0
    for argv in (["tiny", "--target", "tpu-9"], ["tiny", "--target", "h100x8", "--mesh", "x=2"],
                 ["--target", "h100x8"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert mesh_overrides("fsdp=4, tensor=2") == ["mesh.fsdp=4", "mesh.tensor=2"]


def test_sweep_ranks_fitting_meshes_by_step_time():
    plans = run(_cfg(), "h100x4", sweep=True, top=20, analytic=True)
    assert plans and all(p["fits"] and p["source"] == "analytic" for p in plans)
    times = [p["step_time_s_estimate"] for p in plans]
    assert times == sorted(times)
    meshes = {tuple(p["mesh"].values()) for p in plans}
    assert all(d * f * t == 4 for d, f, t in meshes) and len(meshes) > 1
    # a model that cannot fit anywhere gives no candidate
    big = _cfg("model.d_model=8192", "model.n_heads=64", "model.n_kv_heads=64",
               "model.d_ff=32768", "model.n_layers=64")
    assert run(big, "v5e-4", sweep=True, analytic=True) == []


def test_head_dim_wider_than_d_model_over_heads_is_counted_exactly():
    """model.head_dim=32 with d_model 64, 4 heads (H*K = 128): the analytic params and FLOPs
    use the real K — equal to the sharded state's bytes and to the compiled HLO's FLOPs."""
    cfg = _cfg("model.head_dim=32", "mesh.fsdp=4")
    spec = build_spec(cfg, jax.devices()[:4])
    state = spec.init()
    assert set(bytes_per_device(state["params"]).values()) == {estimate.state_bytes(spec)["params"]}
    one = planner.abstract_spec(_cfg("model.head_dim=32", "mesh.fsdp=1"), 1)
    assert estimate.state_bytes(one)["params"] == 4 * param_count(cfg.model, 256)
    assert param_count(cfg.model, 256) > param_count(_cfg().model, 256)
    out = compile_train_step(cfg, jax.devices()[:4])
    a = hlo.analyze(out.compiled.as_text(), dict(out.spec.mesh.shape))
    assert a.flops == flops_per_token(cfg.model, 256, 64) * 8 * 64 / 4
    assert planner.model_flops_per_step(cfg) == flops_per_token(cfg.model, 256, 64) * 8 * 64


def test_tpu_compiler_out_of_hbm_becomes_a_does_not_fit_plan():
    """libtpu refuses a step whose temporaries exceed HBM (RESOURCE_EXHAUSTED, no memory
    analysis): the plan says it does not fit, with the compiler's figure, not a traceback."""
    cfg, target = _cfg("mesh.fsdp=4"), parse_target("v5e-4")
    err = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required "
                       "for HLO temporaries (15.82G) exceeds available HBM (15.75G).")
    p = planner._compiler_oom(cfg, target, err)
    assert p["fits"] is False and p["source"] == "analytic"
    assert p["memory_per_chip_bytes"]["temp"] == int(15.82 * 2**30)
    assert p["memory_per_chip_bytes"]["total"] > p["hbm_per_chip_bytes"] * 0.98
    assert "refused" in p["estimate_notes"][0] and p["step_time_s_estimate"] > 0
    assert planner._compiler_oom(cfg, target, RuntimeError("INTERNAL: something else")) is None


def test_cpu_probe_is_a_median_and_caller_rates_are_used():
    from jaxlm.plan.probe import cpu_chip, probe_rates

    flops, read, write = probe_rates("float32", samples=3, n=256, nbytes=2**20)
    assert min(flops, read, write) > 1e8  # any CPU does 0.1 GFLOP/s and 0.1 GB/s
    chip = cpu_chip("float32", n_devices=4, rates=(8e10, 8e9, 2e9))
    assert (chip.peak_flops, chip.hbm_bw, chip.write_bw) == (2e10, 2e9, 5e8)
    assert "given rates" in chip.source
    plan = run(_cfg("mesh.fsdp=1"), "cpu", chip=chip, analytic=True)
    assert plan["chip"]["peak_flops"] == 2e10 and plan["roofline"]["compute_s"] == \
        pytest.approx(plan["flops_per_step"] / 2e10)


def test_cpu_roofline_charges_reads_and_writes_at_their_rates():
    """Per kernel: max(FLOPs/peak, read/read_bw + written/write_bw) on the cpu target; the
    TPU/GPU chips (no write_bw) keep bytes/hbm_bw."""
    from jaxlm.plan.targets import Chip, Target

    ops = [(1e9, 3e8, 1e8), (0.0, 6e8, 2e8)]  # (FLOPs, bytes, of which written)
    cpu = Chip("cpu", "cpu", 1e10, 1e9, 4e8, 1e9, 1e9, source="test", write_bw=1e8)
    r = estimate.roofline(1e9, 9e8, [], Target("cpu", cpu, 1), {"data": 1}, ops)
    # kernel 1: max(0.1, 0.5 + 1.0) = 1.5 s; kernel 2: 1.0 + 2.0 = 3.0 s
    assert r["busy_s"] == pytest.approx(4.5) and r["memory_s"] == pytest.approx(4.5)
    # no per-kernel split (an analytic plan): half the bytes read, half written
    r = estimate.roofline(1e9, 9e8, [], Target("cpu", cpu, 1), {"data": 1})
    assert r["memory_s"] == pytest.approx(4.5e8 / 4e8 + 4.5e8 / 1e8)
    same = Chip("x", "gpu", 1e10, 1e9, 4e8, 1e9, 1e9)
    r = estimate.roofline(1e9, 9e8, [], Target("x", same, 1), {"data": 1}, ops)
    assert r["busy_s"] == pytest.approx(0.75 + 1.5) and r["memory_s"] == pytest.approx(2.25)


@pytest.mark.parametrize("argv,message", [
    (["tiny", "--target", "banana"], "--target 'banana' is not a known target; use v4-N"),
    (["tiny", "--target", "v5e-3"], "v5e-3"),
    (["tiny", "--target", "h100x8", "--mesh", "fsdp=3"],
     "mesh.data=1 mesh.fsdp=3 mesh.tensor=1 uses 3 devices but there are 8"),
    (["tiny", "--target", "v5e-16", "--mesh", "fsdp=3,tensor=2"],
     "uses 6 devices but there are 16"),
    (["no_such_config", "--target", "h100x8"], "no preset named 'no_such_config'"),
    (["/nonexistent/plan.yaml", "--target", "cpu"],
     "config file not found: /nonexistent/plan.yaml"),
    (["tiny", "model.d_modl=3", "--target", "h100x8"], "unknown config key 'model.d_modl'"),
    (["tiny", "--target", "h100x8", "--sweep-mesh", "--top", "0"], "--top 0 must be >= 1"),
])
def test_cli_user_errors_are_one_line_exit_2(capsys, argv, message):
    assert main(argv + ["--analytic"]) == 2
    out = capsys.readouterr()
    assert out.err.startswith("error: ") and out.err.count("\n") == 1, out.err
    assert message in out.err and not out.out
