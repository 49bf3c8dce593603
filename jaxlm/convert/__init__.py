"""Checkpoint conversion between jaxlm run directories and other formats (Hugging Face).

``jaxlm-convert hf-to-jaxlm HF_DIR OUT_DIR`` / ``jaxlm-convert jaxlm-to-hf OUT_DIR HF_DIR``
(:mod:`jaxlm.convert.cli`); the functions are in :mod:`jaxlm.convert.hf`. Nothing heavy is
imported here.

Example::

    from jaxlm.convert.hf import hf_to_jaxlm
    hf_to_jaxlm("my_hf_model/", "out/imported")
"""
