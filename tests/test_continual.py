"""Continual pretraining (issue #16 part 2): the infinite schedules against their closed forms,
``init_from=ckpt:`` (bit-identical params at step 0 with a fresh optimizer, @STEP, resume wins,
one-line errors), and init_from together with a replay mixture (``data.sources``)."""

import json
import math
import os

import jax
import numpy as np
import pytest

from jaxlm.config import ConfigError, TrainConfig, load_config
from jaxlm.data import make_data_source
from jaxlm.optim import build_optimizer, lr_at
from jaxlm.optim.schedules import make_schedule
from jaxlm.sharding import make_mesh
from jaxlm.train.checkpoint import Checkpointer, load_trained
from jaxlm.train.loop import own_out_dir, restore_or_init, run
from jaxlm.train.state import StateSpec, resolve_vocab

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")


def reference_lr(t: TrainConfig, k: float) -> float:
    """The module docstring's equations in float64 numpy, for the 1-based update number k."""
    k = min(k, t.steps)
    g = k + t.schedule_offset
    lr, w, c, a = t.lr, t.warmup_steps, t.cooldown_steps, t.anneal_steps
    eta_c, eta_min = lr * t.const_lr_ratio, lr * t.min_lr_ratio
    if g <= w:
        v = lr * g / w
    elif g <= w + c:
        x = (g - w) / c
        if t.schedule == "infinite_cosine":
            v = eta_c + (lr - eta_c) * (1 + np.cos(np.pi * x)) / 2
        else:
            h = lambda y: 1 / np.sqrt(1 + t.rsqrt_alpha * y) - 1  # noqa: E731
            v = lr + (eta_c - lr) * h(x) / h(1.0)
    else:
        v = eta_c
    if a and k > t.steps - a:
        v = eta_c * (eta_min / eta_c) ** ((k - (t.steps - a)) / a)
    return float(v)


SCHED = dict(steps=100, lr=2e-3, warmup_steps=10, cooldown_steps=30, const_lr_ratio=0.25,
             anneal_steps=20, min_lr_ratio=0.01)


@pytest.mark.parametrize("kind", ["infinite_cosine", "infinite_rsqrt"])
@pytest.mark.parametrize("offset", [0, 45])
def test_infinite_schedule_matches_closed_form(kind, offset):
    t = TrainConfig(schedule=kind, schedule_offset=offset, **SCHED)
    sched = make_schedule(t)
    for k in [1, 5, 10, 11, 25, 39, 40, 41, 60, 80, 81, 90, 99, 100, 130]:
        assert float(sched(k - 1)) == pytest.approx(reference_lr(t, k), rel=2e-6), k
    # anchors read off the equations by hand
    if offset == 0:
        assert float(sched(9)) == pytest.approx(2e-3)  # end of warmup: the peak
        assert float(sched(39)) == pytest.approx(5e-4)  # end of cooldown: eta_c
        assert float(sched(60)) == pytest.approx(5e-4)  # constant phase
        if kind == "infinite_cosine":  # half-way through the cosine cooldown: the mean
            assert float(sched(24)) == pytest.approx((2e-3 + 5e-4) / 2)
    else:  # offset 45 >= W + C: no warmup, no cooldown, constant from the first update
        assert float(sched(0)) == pytest.approx(5e-4)
    assert float(sched(99)) == pytest.approx(2e-5)  # the final annealed value eta_min
    assert float(sched(89)) == pytest.approx(5e-4 * (2e-5 / 5e-4) ** 0.5, rel=1e-5)


@pytest.mark.parametrize("kind", ["infinite_cosine", "infinite_rsqrt"])
def test_infinite_schedule_is_continuous_at_phase_boundaries(kind):
    sched = make_schedule(TrainConfig(schedule=kind, **SCHED))
    eps = 1e-3  # the schedule is a function of a real count too
    for boundary_k in (10, 40, 80):  # end of warmup, of cooldown, start of annealing
        i = boundary_k - 1
        left, right = float(sched(i - eps)), float(sched(i + eps))
        assert abs(left - right) < 2e-3 * max(left, right), (boundary_k, left, right)
    # and monotone non-increasing after warmup (cooldown -> constant -> annealing)
    values = np.array([float(sched(i)) for i in range(9, 100)])
    assert np.all(np.diff(values) <= 1e-12)


def test_offset_shifts_the_schedule():
    plain = make_schedule(TrainConfig(schedule="infinite_cosine", **{**SCHED, "anneal_steps": 0}))
    shifted = make_schedule(TrainConfig(schedule="infinite_cosine", schedule_offset=7,
                                        **{**SCHED, "anneal_steps": 0}))
    for i in range(0, 80):
        assert float(shifted(i)) == pytest.approx(float(plain(i + 7)), rel=1e-6)


@pytest.mark.parametrize("overrides, match", [
    (["train.schedule_offset=5"], "only applies to the infinite"),
    (["train.schedule=infinite_cosine", "train.steps=50", "train.warmup_steps=10",
      "train.cooldown_steps=30", "train.anneal_steps=20"], "before the constant phase"),
    (["train.schedule=infinite_rsqrt", "train.const_lr_ratio=0"], "const_lr_ratio"),
    (["train.schedule=infinite_cosine", "train.cooldown_steps=-1"], "cooldown_steps"),
    (["init_from=ckpt"], "init_from=ckpt:OUT_DIR"),
    (["init_from=s3:bucket/run"], "init_from=ckpt:OUT_DIR"),
    (["init_from=ckpt:out/run@last"], "step number"),
])
def test_bad_settings_are_one_line_errors(overrides, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(TINY, overrides)
    assert "\n" not in str(e.value)


# -- init_from ------------------------------------------------------------------------------

COMMON = ["train.log_every=1", "train.eval_batches=0", "train.sample_tokens=0"]
INFINITE = ["train.schedule=infinite_cosine", "train.warmup_steps=2", "train.cooldown_steps=4",
            "train.const_lr_ratio=0.5", "train.anneal_steps=3", "train.min_lr_ratio=0.05"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 12-step tiny run with an infinite schedule, checkpoints at steps 4, 8 and 12."""
    out = str(tmp_path_factory.mktemp("source"))
    cfg = load_config(TINY, [f"out_dir={out}", "train.steps=12", "ckpt.every=4", "ckpt.keep=3",
                             *COMMON, *INFINITE])
    run(cfg)
    return out, cfg


def test_logged_lr_follows_the_infinite_schedule(source):
    out, cfg = source
    with open(os.path.join(out, "metrics.jsonl")) as f:
        logged = {r["step"]: r["lr"] for r in map(json.loads, f) if "lr" in r}
    assert sorted(logged) == list(range(1, 13))
    for step, lr in logged.items():  # step s applied the update with count s - 1
        assert lr == pytest.approx(reference_lr(cfg.train, step), rel=2e-6)
    assert logged[12] == pytest.approx(3e-3 * 0.05, rel=1e-5)  # annealed to eta_min


def start(overrides, preset=TINY):
    """Build a run's spec and restore_or_init it, as run() does, without training."""
    cfg = load_config(preset, [*COMMON, *overrides])
    cfg = resolve_vocab(cfg, make_data_source(cfg.data).tokenizer.vocab_size)
    spec = StateSpec.build(cfg, make_mesh(cfg.mesh), build_optimizer(cfg))
    with own_out_dir(cfg) as ckpt:
        try:
            state, latest = restore_or_init(cfg, spec, ckpt, None)
        finally:
            ckpt.close()
    return cfg, spec, state, latest


def same_bits(a, b) -> bool:
    return all(np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_init_from_ckpt_takes_the_params_and_nothing_else(source, tmp_path):
    src, _ = source
    _, _, trained = load_trained(src)  # the latest step: 12
    cfg, spec, state, latest = start([f"out_dir={tmp_path}", f"init_from=ckpt:{src}"])
    assert latest is None and int(state["step"]) == 0
    assert same_bits(state["params"], trained)
    assert int(state["opt_state"].count) == 0  # a fresh optimizer: no update counted
    mu = [x for x in jax.tree.leaves(state["opt_state"]) if getattr(x, "ndim", 0) >= 2]
    assert mu and all(not np.any(np.asarray(x)) for x in mu)  # zero moments
    assert same_bits(state["rng"], jax.random.PRNGKey(cfg.seed))
    first = jax.tree.leaves(state["params"])[0]
    assert first.sharding == jax.tree.leaves(spec.shardings["params"])[0]  # the run's sharding
    assert lr_at(cfg, 0) == pytest.approx(3e-3 / 10)  # the fresh cosine schedule re-warms


def test_init_from_at_step_picks_that_step(source, tmp_path):
    src, _ = source
    _, spec, _ = load_trained(src)  # the source's saved (resolved) config and its spec
    ckpt = Checkpointer(src, spec.cfg.ckpt, writable=False)
    step8 = ckpt.restore(8, spec.abstract_with_shardings())["params"]
    ckpt.close()
    _, _, state, _ = start([f"out_dir={tmp_path}", f"init_from=ckpt:{src}@8"])
    assert same_bits(state["params"], step8)
    assert not same_bits(state["params"], load_trained(src)[2])
    with pytest.raises(ConfigError, match=r"no checkpoint at step 5 \(it keeps steps 4, 8, 12\)"):
        start([f"out_dir={tmp_path / 'other'}", f"init_from=ckpt:{src}@5"])


@pytest.mark.parametrize("override, match", [
    ("model.d_model=32", "model.d_model: checkpoint 64 vs now 32"),
    ("model.vocab_size=300", "model.vocab_size: checkpoint 257 vs now 300"),
    ("data.tokenizer=gpt2", "data.tokenizer: checkpoint 'byte' vs now 'gpt2'"),
])
def test_init_from_another_model_is_one_line(source, tmp_path, override, match):
    src, _ = source
    with pytest.raises(ConfigError, match=match) as e:
        start([f"out_dir={tmp_path}", f"init_from=ckpt:{src}", override])
    assert "\n" not in str(e.value) and "different model" in str(e.value)


def test_init_from_missing_or_empty_dir_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="no such directory") as e:
        start([f"out_dir={tmp_path / 'run'}", f"init_from=ckpt:{tmp_path / 'nope'}"])
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no checkpoints/ directory"):
        start([f"out_dir={tmp_path / 'run'}", f"init_from=ckpt:{tmp_path / 'empty'}"])


def test_existing_out_dir_resumes_and_says_so(source, tmp_path, capfd):
    src, _ = source
    args = [f"out_dir={tmp_path}", f"init_from=ckpt:{src}", "ckpt.every=0", *COMMON]
    first = run(load_config(TINY, args + ["train.steps=2"]))
    assert first["start_step"] == 0
    capfd.readouterr()
    again = run(load_config(TINY, args + ["train.steps=3"]))  # the run's logging goes to stderr
    assert again["start_step"] == 2 and again["step"] == 3
    err = capfd.readouterr().err
    assert "out_dir holds a checkpoint: resuming it; init_from is ignored" in err
    assert "init_from: parameters from" not in err


def test_init_from_with_a_replay_mixture(source, tmp_path, capfd):
    """Replay = data.sources: new data plus a little of the old, from the source's params."""
    src, _ = source
    mix = ("data.sources=[{name: new, path: wikitext2, weight: 0.9}, "
           "{name: replay, path: shakespeare, weight: 0.1}]")
    result = run(load_config(TINY, [f"out_dir={tmp_path}", f"init_from=ckpt:{src}", mix,
                                     "train.steps=3", "ckpt.every=0", "train.log_every=1",
                                     "train.eval_batches=1", "train.sample_tokens=0"]))
    assert "init_from: parameters from" in capfd.readouterr().err
    assert result["start_step"] == 0 and result["step"] == 3
    assert set(result["eval"]["sources"]) == {"new", "replay"}
    assert math.isfinite(result["eval"]["bpb"])


def test_init_from_hf_gives_the_converted_params(tmp_path):
    """init_from=hf:DIR reads the HF directory with jaxlm.convert (issue #16 part 1): the same
    params as its jaxlm-convert hf-to-jaxlm checkpoint, with a fresh optimizer."""
    hf = pytest.importorskip("jaxlm.convert.hf")
    fixture = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "llama")
    conv = tmp_path / "converted"
    hf.hf_to_jaxlm(fixture, str(conv))
    _, _, converted = load_trained(str(conv))
    preset = str(conv / "config.yaml")
    _, _, state, _ = start([f"out_dir={tmp_path / 'run'}", f"init_from=hf:{fixture}"], preset)
    assert same_bits(state["params"], converted)
    assert int(state["step"]) == 0 and int(state["opt_state"].count) == 0
    with pytest.raises(ConfigError) as e:  # another vocabulary than the checkpoint's
        start([f"out_dir={tmp_path / 'other'}", f"init_from=hf:{fixture}", "model.vocab_size=160"],
              preset)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="no such directory"):
        start([f"out_dir={tmp_path / 'other'}", f"init_from=hf:{tmp_path / 'nope'}"], preset)
