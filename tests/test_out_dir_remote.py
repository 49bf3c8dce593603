"""out_dir / data.cache_dir / init_from given as a URL (gs://, s3://, http(s)://): one error line
that names the fix (mount the bucket, e.g. with gcsfuse), never a traceback, and never a stray
local ``gs:`` directory -- through the real CLI, the config API and the lower-level entry points
that a script could call with an unvalidated Config."""

import dataclasses
import os
import subprocess
import sys

import pytest

from jaxlm.cli import train_main
from jaxlm.config import load_config
from jaxlm.errors import ConfigError
from jaxlm.train.lock import acquire_run_lock
from jaxlm.utils.files import check_local_dir, url_scheme
from jaxlm.utils.metrics import MetricWriter

ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
FIX = {"gs://bucket/runs/a": "gcsfuse", "s3://bucket/runs/a": "mountpoint-s3",
       "https://example.com/runs/a": "pass a local directory",
       "http://example.com/runs/a": "pass a local directory",
       "hdfs://namenode/runs/a": "FUSE"}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize("url", sorted(FIX))
def test_cli_refuses_a_url_out_dir_with_the_fix_and_creates_nothing(url, tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.chdir(tmp_path)
    assert train_main([TINY, f"out_dir={url}"]) == 2
    line = _one_error_line(capsys)
    assert f"out_dir={url} is a URL" in line and FIX[url] in line
    assert os.listdir(tmp_path) == []  # no "gs:" / "s3:" / "https:" directory


def test_module_cli_gs_out_dir_one_line_no_stray_directory(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jaxlm.cli", "train", TINY,
                           "out_dir=gs://my-bucket/run1"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0] == ("error: out_dir=gs://my-bucket/run1 is a URL; jaxlm writes to local or "
                        "mounted directories only, not to gs:// directly: mount the bucket with "
                        "gcsfuse (gcsfuse BUCKET /mnt/BUCKET) and pass out_dir=/mnt/BUCKET/PATH")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("override,expect", [
    ("init_from=ckpt:gs://bucket/base@500", "init_from=ckpt:LOCAL_DIR"),
    ("init_from=hf:hf://meta/llama", "huggingface-cli download"),
    ("data.cache_dir=gs://bucket/cache", "data.cache_dir=/mnt/BUCKET/PATH"),
])
def test_other_url_paths_are_refused_at_config_time(override, expect, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="is a URL") as e:
        load_config(TINY, [f"out_dir={tmp_path / 'run'}", override])
    assert expect in str(e.value) and "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []


def test_data_path_url_is_refused_before_out_dir_is_made(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert train_main([TINY, "out_dir=run", "data.path=gs://bucket/corpus.txt"]) == 2
    line = _one_error_line(capsys)
    assert "data.path: gs://bucket/corpus.txt is a remote URL" in line and "gcsfuse" in line
    assert os.listdir(tmp_path) == []


def test_unvalidated_config_is_still_refused_before_any_directory(tmp_path, monkeypatch):
    """A script that builds Config by hand (no validate) reaches the lock and the metrics writer:
    they refuse the URL too."""
    monkeypatch.chdir(tmp_path)
    for url in ("gs://b/r", "s3://b/r"):
        with pytest.raises(ConfigError, match="gcsfuse|mountpoint-s3"):
            acquire_run_lock(url, primary=True)
        with pytest.raises(ConfigError, match="is a URL"):
            MetricWriter(url, tensorboard=False)
    from jaxlm.train.loop import run

    cfg = dataclasses.replace(load_config(TINY, ["peak_flops=1e12"]), out_dir="gs://b/run")
    with pytest.raises(ConfigError, match="out_dir=gs://b/run is a URL"):
        run(cfg)
    assert os.listdir(tmp_path) == []


def test_url_scheme_only_matches_urls(tmp_path):
    assert [url_scheme(p) for p in ("gs://b", "S3://b", "https://x", "out/run", "/abs/p",
                                    "C:/x", "gs:/b", "./gs://b", "")] == \
        ["gs", "s3", "https", "", "", "", "", "", ""]
    check_local_dir(str(tmp_path / "a:b" / "c"))  # a colon in a local path is fine
    check_local_dir("relative/run")


@pytest.mark.parametrize("main,argv", [
    ("prepare_main", ["IN.txt", "--out", "gs://bucket/corpus"]),
    ("sample_main", ["--ckpt", "gs://bucket/run"]),
    ("eval_main", ["--ckpt", "gs://bucket/run"]),
])
def test_prepare_sample_eval_refuse_url_dirs(main, argv, tmp_path, monkeypatch, capsys):
    import jaxlm.cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "IN.txt").write_text("one document\n\nanother\n")
    assert getattr(jaxlm.cli, main)(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gs://bucket/" in err[0] and "gcsfuse" in err[0]
    assert os.listdir(tmp_path) == ["IN.txt"]  # no stray gs: directory
