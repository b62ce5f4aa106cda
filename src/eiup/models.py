"""Finding, checking and loading Stable Diffusion pipelines for erasure.

`inspect_model` checks a model folder or hub id without loading any weights (cheap, so the CLI
can fail fast); `load_pipeline` then loads it as an `EIUPPipeline` (SD 1.x/2.x) or
`EIUPXLPipeline` (SDXL), chosen from `model_index.json`'s `_class_name`.

Safety rules, always applied:
- weights are loaded from safetensors only (`use_safetensors=True`); a folder whose weights are
  pickled (`*.bin`, `*.ckpt`, `*.pt`, `*.pth`) is refused, because unpickling can run arbitrary
  code hidden in the file;
- no code is ever imported from a model folder or repo: no custom pipelines, no custom
  components (every component must come from `diffusers` or `transformers`),
  `trust_remote_code=False`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
SUPPORTED_PIPELINES = {
    "StableDiffusionPipeline": "sd",
    "EIUPPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "EIUPXLPipeline": "sdxl",
}
REQUIRED_COMPONENTS = {
    "sd": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
}
# components that carry weights (the others are tokenizers, schedulers, processors: JSON/text)
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "safety_checker", "image_encoder")
ALLOWED_LIBRARIES = ("diffusers", "transformers")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")

REAL_WEIGHTS_HINT = (
    "To use real Stable Diffusion weights, pass --model /path/to/stable-diffusion-v1-5 (a diffusers "
    "folder with model_index.json, e.g. saved by save_pretrained or copied from the hub cache) "
    "or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5 on a machine with network "
    "access or the model in its Hugging Face cache (a GPU is advised)."
)
CONVERT_HINT = (
    "To convert pickled weights you trust (they can run code when loaded, so only do this for "
    "a source you trust, ideally in a sandbox): python -c \"from diffusers import "
    "StableDiffusionPipeline as P; P.from_pretrained('IN_DIR', use_safetensors=False)"
    ".save_pretrained('OUT_DIR', safe_serialization=True)\" (for a single .ckpt file: "
    "P.from_single_file('model.ckpt').save_pretrained('OUT_DIR', safe_serialization=True)); "
    "then pass --model OUT_DIR."
)


class ModelLoadError(RuntimeError):
    """A model that cannot be used; the message says why and what to do."""


class ModelNotFoundError(ModelLoadError):
    pass


class NotAPipelineError(ModelLoadError):
    pass


class UnsafeWeightsError(ModelLoadError):
    pass


class UnsupportedModelError(ModelLoadError):
    pass


@dataclass(frozen=True)
class ModelInfo:
    """What `inspect_model` found. `location` is an absolute folder or a hub repo id."""

    source: str  # "bundled" | "local" | "hub"
    location: str
    class_name: str
    family: str  # "sd" | "sdxl"
    variant: str | None = None
    cached: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "location": self.location, "class_name": self.class_name,
                "family": self.family, "variant": self.variant}


def default_model_path() -> Path:
    """The bundled toy-world pipeline folder (it may be absent in a source checkout)."""
    import eiup

    return Path(eiup.__file__).resolve().parent / "toy" / "weights" / "pipeline"


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str):
    """float16 on CUDA, float32 elsewhere (CPU kernels for fp16 are slow or missing)."""
    import torch

    return torch.float16 if str(device).startswith("cuda") else torch.float32


def looks_like_hub_id(model: str) -> bool:
    return bool(_HUB_ID_RE.match(model)) and not model.startswith((".", "~"))


# ---------------------------------------------------------------- inspection (no weights loaded)


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NotAPipelineError(f"{path}: unreadable {what} ({e})") from None
    if not isinstance(data, dict):
        raise NotAPipelineError(f"{path}: {what} is not a JSON object")
    return data


def check_model_index(index: dict, where: str) -> tuple[str, str]:
    """Validate a model_index.json dict; return (class_name, family)."""
    cls = index.get("_class_name")
    if isinstance(cls, list):
        raise UnsafeWeightsError(
            f"{where}: model_index.json names a custom pipeline ({cls}); eiup never runs code from a "
            "model folder. Use a standard diffusers Stable Diffusion pipeline folder."
        )
    if not isinstance(cls, str) or not cls:
        raise NotAPipelineError(f"{where}: model_index.json has no _class_name; not a diffusers pipeline folder.")
    if cls not in SUPPORTED_PIPELINES:
        raise UnsupportedModelError(
            f"{where}: {cls} is not supported. EIUP erases concepts in the cross-attention of a "
            f"Stable Diffusion UNet; supported pipelines: {', '.join(SUPPORTED_PIPELINES)} "
            "(SD 1.x, SD 2.x, SDXL)."
        )
    family = SUPPORTED_PIPELINES[cls]
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list):
            continue
        lib = entry[0] if entry else None
        if lib is not None and lib not in ALLOWED_LIBRARIES:
            raise UnsafeWeightsError(
                f"{where}: component {name!r} is loaded by custom code ({entry}); eiup only loads "
                f"components from {' or '.join(ALLOWED_LIBRARIES)} and never runs code from a model folder."
            )
    missing = [c for c in REQUIRED_COMPONENTS[family] if not (isinstance(index.get(c), list) and index[c][0])]
    if missing:
        raise NotAPipelineError(f"{where}: model_index.json lacks the component(s) {', '.join(missing)} that {cls} needs.")
    return cls, family


def check_unet_config(config: dict, where: str) -> None:
    """A UNet whose blocks have no cross-attention gives EIUP nothing to act on."""
    blocks = [*(config.get("down_block_types") or ()), *(config.get("up_block_types") or ()),
              str(config.get("mid_block_type") or "")]
    if not any("CrossAttn" in str(b) for b in blocks):
        raise UnsupportedModelError(
            f"{where}: this UNet has no cross-attention blocks ({', '.join(map(str, blocks))}); EIUP suppresses "
            "concepts inside cross-attention, so it cannot erase anything with this model."
        )


def _weights_variant(folder: Path, components: list[str]) -> str | None:
    """Check every weight component holds safetensors; return 'fp16' if only that variant is there."""
    need_variant = []
    for comp in components:
        d = folder / comp
        if not d.is_dir():
            raise NotAPipelineError(
                f"{folder}: model_index.json lists {comp!r} but the folder {comp}/ is missing (incomplete download/copy?)"
            )
        files = [p for p in d.iterdir() if p.is_file()]
        safet = [p.name for p in files if p.name.endswith(".safetensors")]
        pickled = [p.name for p in files if p.name.lower().endswith(PICKLE_SUFFIXES)]
        if not safet:
            if pickled:
                raise UnsafeWeightsError(
                    f"{d}: weights are pickled ({', '.join(sorted(pickled)[:3])}) with no .safetensors copy. eiup "
                    "refuses pickled weights because loading them can execute arbitrary code. " + CONVERT_HINT
                )
            raise NotAPipelineError(f"{d}: no weights found (expected *.safetensors).")
        plain = [n for n in safet if not re.search(r"\.(fp16|bf16|fp32|non_ema|ema)\.safetensors$|\.(fp16|bf16)-\d", n)]
        if not plain:
            need_variant.append(comp)
            if not any(".fp16." in n or ".fp16-" in n for n in safet):
                raise NotAPipelineError(f"{d}: only variant weights ({', '.join(safet[:3])}); eiup reads plain or fp16 safetensors.")
    return "fp16" if need_variant else None


def _inspect_local(folder: Path, source: str) -> ModelInfo:
    if folder.is_file():
        if folder.name.lower().endswith(PICKLE_SUFFIXES):
            raise UnsafeWeightsError(
                f"{folder}: a single pickled checkpoint. eiup refuses pickled weights because loading them can "
                "execute arbitrary code, and it needs a diffusers pipeline folder. " + CONVERT_HINT
            )
        raise NotAPipelineError(
            f"{folder}: a single file, not a diffusers pipeline folder. Convert a single-file checkpoint with "
            "python -c \"from diffusers import StableDiffusionPipeline as P; P.from_single_file('FILE.safetensors')"
            ".save_pretrained('OUT_DIR', safe_serialization=True)\" and pass --model OUT_DIR."
        )
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        pickled = sorted(p.name for p in folder.iterdir() if p.name.lower().endswith(PICKLE_SUFFIXES))
        extra = ""
        if pickled:
            extra = (f" It holds pickled checkpoint(s) ({', '.join(pickled[:3])}), which eiup refuses because loading "
                     "them can execute arbitrary code. " + CONVERT_HINT)
        raise NotAPipelineError(
            f"{folder}: not a diffusers Stable Diffusion pipeline folder (no model_index.json). Expected the "
            "layout written by save_pretrained: model_index.json, unet/, vae/, text_encoder/, tokenizer/, "
            "scheduler/." + extra
        )
    index = _read_json(index_path, "model_index.json")
    cls, family = check_model_index(index, str(folder))
    components = [c for c in WEIGHT_COMPONENTS if isinstance(index.get(c), list) and index[c][0]]
    variant = _weights_variant(folder, components)
    check_unet_config(_read_json(folder / "unet" / "config.json", "unet/config.json"), str(folder))
    return ModelInfo(source=source, location=str(folder), class_name=cls, family=family, variant=variant)


def _hub_json(repo_id: str, filename: str) -> tuple[dict, bool]:
    """Fetch a small JSON file of a hub repo: from the local cache if there, else the network."""
    from huggingface_hub import hf_hub_download

    try:
        return _read_json(Path(hf_hub_download(repo_id, filename, local_files_only=True)), filename), True
    except ModelLoadError:
        raise
    except Exception:
        pass
    try:
        return _read_json(Path(hf_hub_download(repo_id, filename)), filename), False
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelNotFoundError(
            f"{repo_id!r} is not a local folder, and {filename} could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Hub ids only work with network "
            f"access or a model already in the local Hugging Face cache. {REAL_WEIGHTS_HINT}"
        ) from None


def _inspect_hub(repo_id: str) -> ModelInfo:
    index, cached = _hub_json(repo_id, "model_index.json")
    cls, family = check_model_index(index, repo_id)
    unet_cfg, _ = _hub_json(repo_id, "unet/config.json")
    check_unet_config(unet_cfg, repo_id)
    return ModelInfo(source="hub", location=repo_id, class_name=cls, family=family, cached=cached)


def inspect_model(model: str | Path | None = None) -> ModelInfo:
    """Check that `model` (folder, hub id, or None = bundled toy) is a loadable SD pipeline.

    Reads only JSON configs and file names; raises a ModelLoadError subclass with an
    explanation and a way out when the model cannot be used.
    """
    if model is None or str(model) == "":
        path = default_model_path()
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"the bundled toy model is missing from this installation (expected {path}); it ships with "
                f"release builds of eiup, or is built by training the toy model (`eiup toy train --export-to <that folder>`). {REAL_WEIGHTS_HINT}"
            )
        return _inspect_local(path, "bundled")
    text = str(model)
    path = Path(text).expanduser()
    if path.exists():
        return _inspect_local(path.resolve(), "local")
    if isinstance(model, str) and looks_like_hub_id(text):
        return _inspect_hub(text)
    raise ModelNotFoundError(f"{text}: no such folder (and not a hub id of the form owner/name). {REAL_WEIGHTS_HINT}")


# ---------------------------------------------------------------- loading


def pipeline_class(family: str):
    """EIUPPipeline / EIUPXLPipeline for 'sd' / 'sdxl'."""
    from eiup.pipeline import EIUPPipeline, EIUPXLPipeline

    return {"sd": EIUPPipeline, "sdxl": EIUPXLPipeline}[family]


def _dtype_kwarg(dtype) -> dict:
    try:  # diffusers >= 0.36 renamed torch_dtype to dtype
        from diffusers.pipelines.pipeline_utils import _resolve_dtype  # noqa: F401

        return {"dtype": dtype}
    except ImportError:
        return {"torch_dtype": dtype}


def has_cross_attention(unet) -> bool:
    return any(name.endswith("attn2.processor") for name in getattr(unet, "attn_processors", {}))


def load_pipeline(model: str | Path | ModelInfo | None = None, device: str | None = None, dtype=None):
    """Load `model` (folder, hub id, ModelInfo, or None = the bundled toy) for erasure.

    Returns an EIUPPipeline (SD 1.x/2.x) or EIUPXLPipeline (SDXL) on `device` (default: CUDA if
    available, else CPU) in `dtype` (default: float16 on CUDA, float32 otherwise; the toy
    weights are stored in float16 and upcast on CPU).
    """
    import torch

    info = model if isinstance(model, ModelInfo) else inspect_model(model)
    device = device or default_device()
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available; use device='cpu'")
    dtype = dtype or default_dtype(device)
    cls = pipeline_class(info.family)
    kwargs: dict[str, Any] = dict(
        use_safetensors=True, custom_pipeline=None, trust_remote_code=False, **_dtype_kwarg(dtype)
    )
    if info.variant:
        kwargs["variant"] = info.variant
    try:
        if info.source == "hub" and info.cached:
            try:
                pipe = cls.from_pretrained(info.location, local_files_only=True, **kwargs)
            except (OSError, ValueError):
                pipe = cls.from_pretrained(info.location, **kwargs)  # partially cached: fetch the rest
        else:
            pipe = cls.from_pretrained(info.location, **kwargs)
    except (OSError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "safetensors" in str(e).lower():
            raise UnsafeWeightsError(
                f"{info.location}: no safetensors weights ({msg}). eiup refuses pickled weights because loading "
                "them can execute arbitrary code. " + CONVERT_HINT
            ) from e
        hint = f" {REAL_WEIGHTS_HINT}" if info.source == "hub" else ""
        raise ModelLoadError(f"{info.location}: could not load the pipeline: {msg}{hint}") from e
    if not has_cross_attention(pipe.unet):
        raise UnsupportedModelError(f"{info.location}: the UNet has no cross-attention layers; EIUP cannot erase anything.")
    pipe.to(device)
    return pipe
