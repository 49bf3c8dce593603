"""Weighted mixtures (``data.sources``): proportions, determinism, resume, per-source eval, and
one-line errors for bad source lists."""

import json
import os

import numpy as np
import pytest

from jaxlm.cli import eval_main, train_main
from jaxlm.config import ConfigError, DataConfig, load_config
from jaxlm.data.mixture import MixtureDataSource
from jaxlm.data.modes import make_data_source
from jaxlm.data.pipeline import HeldOut, train_dataset_from_rows
from jaxlm.train.step import evaluate_groups

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")


class TaggedRows:
    """Rows ``{"src": tag, "id": i}``: enough to see which source and row a batch came from."""

    def __init__(self, tag: int, n: int):
        self.tag, self.n = tag, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"src": np.int32(self.tag), "id": np.int32(i)}


class FakeSource(HeldOut):
    def __init__(self, cfg: DataConfig):
        self.tag = int(cfg.path)
        self.tokenizer = None

    def train_dataset(self, *, batch_size, process_index=0, process_count=1, seed=0):
        return train_dataset_from_rows(TaggedRows(self.tag, 97 + self.tag), batch_size=batch_size,
                                       process_index=process_index, process_count=process_count,
                                       seed=seed, shuffle=True)


def fake_mixture(weights, **kw):
    sources = [{"name": f"s{i}", "path": str(i), "weight": w} for i, w in enumerate(weights)]
    cfg = load_config(None, [f"data.sources={json.dumps(sources)}"]).data
    return MixtureDataSource(cfg, FakeSource)


def test_proportions_follow_the_weights_over_10k_samples():
    weights = [0.7, 0.2, 0.1]
    it = fake_mixture([7, 2, 1]).train_iterator(batch_size=1, seed=3)
    tags = np.array([int(next(it)["src"][0]) for _ in range(10_000)])
    frac = np.bincount(tags, minlength=3) / len(tags)
    np.testing.assert_allclose(frac, weights, atol=0.02)
    # and every prefix is already close: grain's selection is deterministic, not a coin flip
    for n in (10, 100, 1000):
        np.testing.assert_allclose(np.bincount(tags[:n], minlength=3) / n, weights, atol=2 / n)


def _stream(src, n, **kw):
    it = src.train_iterator(batch_size=4, **kw)
    return [next(it) for _ in range(n)]


def test_same_global_batches_for_any_process_count_and_deterministic():
    one = _stream(fake_mixture([3, 1]), 24, seed=5)
    again = _stream(fake_mixture([3, 1]), 24, seed=5)
    halves = [_stream(fake_mixture([3, 1]), 24, seed=5, process_index=p, process_count=2)
              for p in range(2)]
    for b in range(24):
        assert one[b]["id"].tolist() == again[b]["id"].tolist()
        glued = np.concatenate([halves[0][b]["id"], halves[1][b]["id"]])
        assert one[b]["id"].tolist() == glued.tolist()
        assert len(set(one[b]["src"].tolist())) == 1  # whole batches come from one source
    other_seed = _stream(fake_mixture([3, 1]), 24, seed=6)
    assert any(a["id"].tolist() != b["id"].tolist() for a, b in zip(one, other_seed))


def test_resume_is_exact_and_new_weights_keep_each_sources_position():
    src = fake_mixture([3, 1])
    it = src.train_iterator(batch_size=4, seed=1)
    for _ in range(10):
        next(it)
    state = it.get_state()
    rest = [next(it) for _ in range(12)]
    it2 = fake_mixture([3, 1]).train_iterator(batch_size=4, seed=1)
    it2.set_state(state)
    assert all((a["id"] == b["id"]).all() and (a["src"] == b["src"]).all()
               for a, b in zip(rest, (next(it2) for _ in range(12))))
    # a later phase with other weights: each source continues where it stopped (documented)
    it3 = fake_mixture([1, 1]).train_iterator(batch_size=4, seed=1)
    it3.set_state(state)
    new = [next(it3) for _ in range(12)]
    for tag in (0, 1):
        old_next = next(b for b in rest if b["src"][0] == tag)
        assert (next(b for b in new if b["src"][0] == tag)["id"] == old_next["id"]).all()
    assert sum(int(b["src"][0]) for b in new) == 6  # and the new 1:1 weights apply at once


def test_evaluate_groups_pools_sums_and_reports_each_source():
    totals = {"a": (10.0, 5.0, 8.0), "b": (30.0, 10.0, 12.0), "empty": (0.0, 0.0, 0.0)}

    def eval_fn(params, batch):  # one batch = the set's name; returns its sums
        nll, tok, byt = totals[batch]
        return {"nll_sum": nll, "tokens": tok, "bytes": byt}

    import jaxlm.train.step as step_mod
    orig = step_mod.host_to_global
    step_mod.host_to_global = lambda b, mesh: b
    try:
        ev = evaluate_groups(eval_fn, None, {k: [k] for k in totals}, mesh=None)
    finally:
        step_mod.host_to_global = orig
    assert ev["loss"] == pytest.approx(40 / 15)
    assert ev["bpb"] == pytest.approx(40 / (np.log(2) * 20))
    assert ev["sources"]["a"]["bpb"] == pytest.approx(10 / (np.log(2) * 8))
    assert ev["sources"]["b"]["loss"] == pytest.approx(3.0)
    assert "empty" not in ev["sources"]  # a metric over zero tokens is never reported


@pytest.mark.parametrize("mode", ["concat", "pack", "dd"])
def test_real_sources_in_every_mode(tmp_path, mode):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("".join(f"alpha {i} " * 40 + "\n\n" for i in range(60)))
    b.write_text("".join(f"BETA {i} " * 30 + "\n\n" for i in range(60)))
    extra = {"dd": ["data.min_bucket=16"], "concat": []}.get(mode, [])
    extra += [f"data.mode={mode}", f"data.cache_dir={tmp_path / 'c'}"]
    cfg = load_config(TINY, extra + [
        f"data.sources=[{{name: a, path: {a}, weight: 1}}, {{name: b, path: {b}, weight: 1}}]"])
    src = make_data_source(cfg.data)
    kw = {"total_steps": 8} if src.wants_total_steps else {}
    it = src.train_iterator(batch_size=8, seed=0, **kw)
    texts = [bytes(next(it)["inputs"][0].astype(np.uint8)).decode("latin-1") for _ in range(8)]
    assert sum("alpha" in t for t in texts) == 4 and sum("BETA" in t for t in texts) == 4
    groups = src.eval_groups(batch_size=8, num_batches=1)
    assert list(groups) == ["a", "b"] and all(len(g) == 1 for g in groups.values())
    if mode == "dd":
        assert src.batch_shapes(8)  # the union of the sources' DD shapes


def test_training_logs_eval_bpb_per_source(tmp_path, capsys):
    out = tmp_path / "run"
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("to be or not to be, that is the question. " * 200)
    b.write_text("0123456789 " * 800)
    rc = train_main([TINY, f"out_dir={out}", "train.steps=20", "train.eval_every=10",
                     f"data.sources=[{{name: prose, path: {a}, weight: 0.5}}, "
                     f"{{name: digits, path: {b}, weight: 0.5}}]"])
    assert rc == 0
    evals = [json.loads(x) for x in open(out / "metrics.jsonl") if "eval_bpb" in x]
    assert [e["step"] for e in evals] == [10, 20]
    for e in evals:
        per = [e["eval_bpb/prose"], e["eval_bpb/digits"]]
        assert min(per) <= e["eval_bpb"] <= max(per)  # the pooled value lies between
    assert evals[1]["eval_bpb/digits"] < evals[0]["eval_bpb/digits"]  # it learns both
    # jaxlm-eval without --data scores the same held-out sets: the same numbers as the loop
    assert eval_main(["--ckpt", str(out), "--max-batches", "2"]) == 0
    lines = dict(kv.split("=") for ln in capsys.readouterr().out.splitlines()
                 for kv in ln.split() if "/" in kv.split("=")[0])
    for name in ("prose", "digits"):
        assert float(lines[f"eval_bpb/{name}"]) == pytest.approx(evals[1][f"eval_bpb/{name}"],
                                                                  abs=1e-4)


@pytest.mark.parametrize("sources,needle", [
    ("[{name: a, path: x, weight: -1}]", "must be a positive number"),
    ("[{name: a, path: x, weight: 0}]", "must be a positive number"),
    ("[{name: a, path: x, weight: lots}]", "expected float"),
    ("[{name: a, path: x, weight: 1}, {name: a, path: y, weight: 1}]", "used twice"),
    ("[{name: 'a b', path: x, weight: 1}]", "names the eval_bpb"),
    ("[{name: a, weight: 1}]", "has no path"),
    ("{name: a, path: x, weight: 1}", "expected a list"),
])
def test_bad_source_lists_are_one_line_errors(sources, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        load_config(None, [f"data.sources={sources}"])
    assert "\n" not in str(e.value)


def test_sources_with_data_path_and_empty_source(tmp_path, capsys):
    with pytest.raises(ConfigError, match="replaces data.path"):
        load_config(None, ["data.path=shakespeare", "data.sources=[{name: a, path: x, weight: 1}]"])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    rc = train_main([TINY, f"out_dir={tmp_path / 'r'}", f"data.sources=[{{name: web, path: "
                     f"shakespeare, weight: 1}}, {{name: code, path: {empty}, weight: 1}}]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "'code'" in err[0] and "empty" in err[0]
    assert not os.path.exists(tmp_path / "r" / "metrics.jsonl")  # nothing started, nothing lost


def test_sources_from_yaml(tmp_path):
    cfg_file = tmp_path / "mix.yaml"
    cfg_file.write_text("data:\n  sources:\n    - {name: web, path: shakespeare, weight: 0.9}\n"
                        "    - name: wiki\n      path: wikitext2\n      weight: 0.1\n")
    cfg = load_config(str(cfg_file))
    assert [(s.name, s.weight) for s in cfg.data.sources] == [("web", 0.9), ("wiki", 0.1)]


def test_resume_rules_for_sources():
    """Changing weights or adding a source resumes (logged with what happens); switching between
    one data.path and a mixture is refused up front, naming the setting (never 'unusable')."""
    from jaxlm.train.compat import check_compatible, describe_changes

    src = "data.sources=[{name: a, path: x, weight: 3}, {name: b, path: y, weight: 1}]"
    mix = load_config(None, [src])
    reweighted = load_config(None, [src.replace("weight: 3", "weight: 1")])
    check_compatible(mix, reweighted)
    assert any("new weights apply" in ln for ln in describe_changes(mix, reweighted))
    for saved, now in ((load_config(None, []), mix), (mix, load_config(None, []))):
        with pytest.raises(ConfigError, match="data.sources: checkpoint .*intact|intact.*data"
                                              ".sources"):
            check_compatible(saved, now)
