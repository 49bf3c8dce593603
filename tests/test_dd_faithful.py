"""Dataset Decomposition as the paper / apple/ml-dataset-decomposition define it, with tests that
tell the variants apart: the randomized overflow rule P(2^k) ∝ 2^(max-k) vs greedy max-bucket
pieces, Algorithm 1's odds vs the repo's odds × tokens with *unequal* buckets, and curriculum
cycles aligned to the training run (not to passes over the data)."""

import json
import os

import numpy as np
import pytest

from jaxlm.config import ConfigError
from jaxlm.data import decompose
from jaxlm.data.bucketing import (CurriculumMap, curriculum_odds, curriculum_schedule,
                                  cycle_quota, overflow_probs, piece_table)

BUCKETS = [8, 16, 32, 64]


class Offsets:
    """The part of a TokenCorpus that piece_table reads."""

    def __init__(self, lengths):
        self.offsets = np.concatenate([[1], 1 + np.cumsum(lengths)]).astype(np.int64)


def test_overflow_follows_p_proportional_to_2_pow_max_minus_k():
    """Documents far longer than the largest bucket: the randomized pieces have
    P(2^k) = 2^(max-k) / Σ — here 8:4:2:1 over 8, 16, 32, 64 — so every bucket gets the same
    expected overflow tokens; greedy puts every overflow token in the 64 bucket."""
    np.testing.assert_allclose(overflow_probs(BUCKETS), np.array([8, 4, 2, 1]) / 15)
    lengths = np.full(400, 2000)
    corpus = Offsets(lengths)
    pieces, dropped = piece_table(corpus, BUCKETS, "random")
    counts = np.array([len(pieces[L]) for L in BUCKETS], float)
    # the last < 128 tokens of each doc are cut greedily (binary); the rest is the random part
    tail = {L: 0 for L in BUCKETS}
    starts = np.sort(np.concatenate([pieces[L] for L in BUCKETS]))
    lens = {int(s): L for L in BUCKETS for s in pieces[L]}
    for j in range(len(lengths)):  # contiguous from the doc start; the tail is binary
        a, b = corpus.offsets[j], corpus.offsets[j + 1]
        mine = starts[(starts >= a) & (starts < b)]
        seq = [lens[int(s)] for s in mine]
        assert mine[0] == a and all(mine[i] + seq[i] == mine[i + 1] for i in range(len(mine) - 1))
        covered, rem = sum(seq), int(b - a)
        assert rem - covered == (b - a) % 8 and dropped >= 0
        k = 0
        while rem >= 128:  # replay: random pieces while >= 2 x max
            rem -= seq[k]
            k += 1
        assert seq[k:] == decompose(rem, BUCKETS)
        for L in seq[k:]:
            tail[L] += 1
    rand = counts - np.array([tail[L] for L in BUCKETS])
    p = rand / rand.sum()
    n = rand.sum()
    assert n > 20000
    np.testing.assert_allclose(p, overflow_probs(BUCKETS), atol=4 * np.sqrt(0.25 / n))
    tok = rand * np.array(BUCKETS)
    np.testing.assert_allclose(tok / tok.sum(), 0.25, atol=0.02)  # equal token share
    greedy, _ = piece_table(corpus, BUCKETS, "greedy")
    g_tok = np.array([len(greedy[L]) * L for L in BUCKETS])
    assert g_tok[-1] / g_tok.sum() > 0.95
    again, _ = piece_table(corpus, BUCKETS, "random")  # seeded: the same table every time
    assert all(np.array_equal(again[L], pieces[L]) for L in BUCKETS)
    with pytest.raises(ConfigError, match="data.dd_overflow='x'"):
        piece_table(corpus, BUCKETS, "x")


def test_decompose_random_rule_single_document():
    rng = np.random.default_rng(3)
    for n in rng.integers(1, 5000, 200).tolist():
        p = decompose(n, BUCKETS, rng)
        assert 0 <= n - sum(p) < 8 and all(x in BUCKETS for x in p)
        if n < 128:  # no overflow: identical to greedy
            assert p == decompose(n, BUCKETS)


def _first_bucket_freq(quota, weights, n=3000):
    odds = curriculum_odds("grow_p2", quota.shape[1])
    firsts = [curriculum_schedule(quota, odds, np.random.default_rng(s), weights)[0]
              for s in range(n)]
    return np.bincount(firsts, minlength=quota.shape[1]) / n


def test_algorithm1_odds_vs_repo_odds_times_tokens_unequal_buckets():
    """Unequal buckets (20 short, 80 long batches), Grow-P2 odds 2:1. Algorithm 1 draws the first
    step short with p = 2/3; the repo's weights 2·20 : 1·80 give p = 1/3 — and Algorithm 1 has
    used up the short bucket by about step 30, the repo form near step 60."""
    quota = np.array([[20, 80]])
    np.testing.assert_allclose(_first_bucket_freq(quota, "paper"), [2 / 3, 1 / 3], atol=0.03)
    np.testing.assert_allclose(_first_bucket_freq(quota, "repo"), [1 / 3, 2 / 3], atol=0.03)
    odds = curriculum_odds("grow_p2", 2)
    last_short = {w: np.mean([np.flatnonzero(curriculum_schedule(
        quota, odds, np.random.default_rng(s), w) == 0).max() for s in range(200)])
        for w in ("paper", "repo")}
    assert last_short["paper"] < 40 and last_short["repo"] > 50, last_short
    equal = np.array([[30, 30]])  # equal buckets: the two forms coincide (same draws)
    a = curriculum_schedule(equal, odds, np.random.default_rng(1), "paper")
    b = curriculum_schedule(equal, odds, np.random.default_rng(1), "repo")
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ConfigError, match="data.curriculum_weights='x'"):
        curriculum_schedule(equal, odds, np.random.default_rng(1), "x")


def test_cycles_span_the_run_not_a_pass_over_the_data():
    """120 steps, 8 cycles, buckets with 30/20/10 batches per pass (60 steps per pass): every
    15-step block is one cycle holding 15 steps in proportion 3:2:1, Grow-P2 (short first)."""
    batches = [30, 20, 10]
    q = cycle_quota(batches, 8, total_steps=120)
    assert q.shape == (8, 3) and q.sum() == 120 and (q.sum(1) == 15).all()
    assert (np.abs(q - np.array([7.5, 5, 2.5])) <= 1).all()
    np.testing.assert_array_equal(q.sum(0), [60, 40, 20])
    m = CurriculumMap(batches, curriculum_odds("grow_p2", 3), 8, seed=0, total_steps=120)
    steps = [m[i] for i in range(240)]  # two periods (a run extended past train.steps)
    sched = np.array([k for k, _ in steps])
    for j in range(16):
        block = sched[15 * j:15 * (j + 1)]
        np.testing.assert_array_equal(np.bincount(block, minlength=3), q[j % 8])
    pos = np.arange(240) % 15  # position within the cycle: the short bucket comes first
    assert pos[sched == 0].mean() < pos[sched > 0].mean() - 1
    for k in range(3):  # each bucket's stream is read on in order, never re-reading an index
        idx = [i for b, i in steps if b == k]
        assert idx == list(range(len(idx)))
    per_pass = CurriculumMap(batches, curriculum_odds("grow_p2", 3), 8, seed=0)
    assert per_pass.epoch_len == 60  # the old behaviour: 8 cycles per pass over the data
    np.testing.assert_array_equal(cycle_quota(batches, 2), [[15, 10, 5], [15, 10, 5]])
    longer = cycle_quota(batches, 2, total_steps=600)  # run > data: buckets repeat, same mix
    np.testing.assert_array_equal(longer, [[150, 100, 50], [150, 100, 50]])


def test_training_run_cycles_follow_train_steps(tmp_path):
    """Through jaxlm.train.loop.run (metrics carry each step's actual seq_len, tokens per step
    are constant): 19 batches per pass (6 short, 13 long), train.steps=8 and
    2 cycles -> two 4-step cycles holding 1 + 2 short batches (per pass, cycle 1 = 3 short + 6
    long batches would fill all 8 steps)."""
    from jaxlm.config import load_config
    from jaxlm.train.loop import run

    rng = np.random.default_rng(0)  # 120 docs of 23 bytes (+ EOT = 24 = 16 + 8: one piece each)
    (tmp_path / "d.txt").write_text("#".join(
        "".join(rng.choice(list("abcdefgh"), 23)) for _ in range(120)))
    out = tmp_path / "run"
    cfg = load_config("configs/tiny.yaml", [
        f"out_dir={out}", "data.mode=dd", f"data.path={tmp_path / 'd.txt'}",
        "data.doc_separator='#'", f"data.cache_dir={tmp_path / 'c'}", "data.seq_len=16",
        "data.min_bucket=8", "data.cycles=2", "train.batch_size=8", "train.steps=8",
        "train.log_every=1", "train.eval_every=0", "train.eval_batches=1", "ckpt.every=0",
        "model.n_layers=1", "peak_flops=1e12"])
    res = run(cfg)
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    seq = [x["seq_len"] for x in lines if "loss" in x]
    assert len(seq) == 8 and np.isfinite(res["eval"]["loss"])
    # each logged step carries its actual seq_len, and every step the same tokens
    assert {x["tokens"] for x in lines if "loss" in x} == {8 * 16}
    # 8 steps x 6/19 short = 2.5: cycle 1 owes 1.26 -> 1 short, cycle 2 owes 1.53 -> 2 short
    np.testing.assert_array_equal(cycle_quota([6, 13], 2, total_steps=8), [[1, 3], [2, 2]])
    assert sorted(seq[:4]) == [8, 16, 16, 16] and sorted(seq[4:]) == [8, 8, 16, 16], seq


def test_run_length_schedule_resumes_exactly_across_periods(tmp_path):
    """total_steps=10: restore at step 7 and continue past the end of the run (step 10, where
    the next period's schedule starts): the same batches as without the interruption."""
    from jaxlm.config import DataConfig
    from jaxlm.data import make_data_source

    rng = np.random.default_rng(0)
    docs = ["".join(rng.choice(list("abcdefgh "), n)) for n in rng.integers(0, 600, 120)]
    (tmp_path / "d.txt").write_text("#".join(docs))
    src = make_data_source(DataConfig(mode="dd", path=str(tmp_path / "d.txt"), doc_separator="#",
                                      seq_len=64, min_bucket=8, cache_dir=str(tmp_path / "c"),
                                      cycles=2))
    kw = dict(batch_size=2, seed=5, total_steps=10)
    a = src.train_iterator(**kw)
    stream = [next(a)["targets"] for _ in range(16)]
    it = src.train_iterator(**kw)
    for _ in range(7):
        next(it)
    fresh = src.train_iterator(**kw)
    fresh.set_state(it.get_state())
    for want in stream[7:]:
        np.testing.assert_array_equal(next(fresh)["targets"], want)
    assert src.schedule.epoch_len == 10
    assert {x.shape[1] for x in stream} >= {8, 64}  # overflow docs reach the short buckets too
