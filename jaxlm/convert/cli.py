"""``jaxlm-convert``: Hugging Face checkpoints in and out of jaxlm run directories.

    jaxlm-convert hf-to-jaxlm HF_DIR OUT_DIR [--overwrite]
        a transformers model directory (config.json + safetensors, maybe tokenizer.json) -> a
        jaxlm run directory (checkpoint at step 0 + config.yaml) for jaxlm-sample / jaxlm-eval /
        init_from=ckpt:OUT_DIR
    jaxlm-convert jaxlm-to-hf OUT_DIR HF_DIR [--overwrite] [--max-shard-gb 2]
        the newest checkpoint of a run -> model-0000k-of-0000n.safetensors + index, config.json,
        generation_config.json (+ tokenizer files) for transformers' from_pretrained

Prints one ``converted ...`` line on success; bad input is one ``error: ...`` line, exit 2
(jaxlm.cli's convention). The work is done by :mod:`jaxlm.convert.hf`.

Example::

    from jaxlm.convert.cli import main
    main(["hf-to-jaxlm", "tests/fixtures/hf/llama", "/tmp/llama_run"])   # -> 0
"""

from __future__ import annotations

import sys

from jaxlm.cli import _guard, _Parser
from jaxlm.config import ConfigError


def _parser() -> _Parser:
    p = _Parser(prog="jaxlm-convert", description="Hugging Face checkpoints in and out.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    a = sub.add_parser("hf-to-jaxlm", help="HF model directory -> jaxlm run directory")
    a.add_argument("hf_dir")
    a.add_argument("out_dir")
    a.add_argument("--overwrite", action="store_true", help="replace a previous conversion")
    b = sub.add_parser("jaxlm-to-hf", help="jaxlm run directory -> HF model directory")
    b.add_argument("out_dir")
    b.add_argument("hf_dir")
    b.add_argument("--overwrite", action="store_true", help="write into a non-empty HF_DIR")
    b.add_argument("--max-shard-gb", type=float, default=2.0,
                   help="largest safetensors shard, in GiB (default 2)")
    return p


def _convert(argv) -> int:
    a = _parser().parse_args(argv)
    from jaxlm.train.loop import setup_logging

    setup_logging()
    from jaxlm.convert import hf

    if a.command == "hf-to-jaxlm":
        cfg = hf.hf_to_jaxlm(a.hf_dir, a.out_dir, overwrite=a.overwrite)
        print(f"converted {a.hf_dir} -> {a.out_dir} (tokenizer={cfg.data.tokenizer}); try: "
              f"jaxlm-sample --ckpt {a.out_dir} --prompt 'Hello'")
        return 0
    if not a.max_shard_gb > 0:
        raise ConfigError(f"jaxlm-convert: --max-shard-gb {a.max_shard_gb} must be > 0")
    files = hf.jaxlm_to_hf(a.out_dir, a.hf_dir, overwrite=a.overwrite,
                           max_shard_bytes=int(a.max_shard_gb * 1024**3))
    print(f"converted {a.out_dir} -> {a.hf_dir} ({len(files)} safetensors shard(s))")
    return 0


def main(argv=None) -> int:
    return _guard(_convert, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
