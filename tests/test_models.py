"""eiup.models: choosing, checking and loading pipelines (tiny random pipelines, no downloads)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from eiup import models


@pytest.fixture(scope="module")
def sd1_dir(tmp_path_factory) -> Path:
    from eiup.testing import tiny_pipeline

    root = tmp_path_factory.mktemp("models")
    pipe = tiny_pipeline("sd1", tmpdir=root / "tok", plain=True)
    pipe.to(torch.float16)  # stored like the bundled toy weights
    pipe.save_pretrained(root / "sd1", safe_serialization=True)
    return root / "sd1"


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


class Boom:
    """Unpickling this object creates a marker file: proof that pickled code would have run."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant_pickle(path: Path, marker: Path) -> None:
    Boom.marker = marker
    path.write_bytes(pickle.dumps(Boom()))


def test_loads_sd1_as_eiup_pipeline_in_float32_on_cpu(sd1_dir):
    from eiup.pipeline import EIUPPipeline

    info = models.inspect_model(sd1_dir)
    assert (info.source, info.class_name, info.family, info.variant) == ("local", "StableDiffusionPipeline", "sd", None)
    pipe = models.load_pipeline(sd1_dir)
    assert isinstance(pipe, EIUPPipeline)
    assert pipe.device.type == "cpu"
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.float32}  # stored fp16, upcast on CPU
    assert pipe.text_encoder.dtype == torch.float32 and pipe.vae.dtype == torch.float32
    assert models.load_pipeline(str(sd1_dir), dtype=torch.bfloat16).unet.dtype == torch.bfloat16


def test_loads_sdxl_and_saved_eiup_pipelines(tmp_path):
    from eiup.pipeline import EIUPPipeline, EIUPXLPipeline
    from eiup.testing import tiny_pipeline

    tiny_pipeline("sdxl", tmpdir=tmp_path / "tok").save_pretrained(tmp_path / "xl", safe_serialization=True)
    assert json.loads((tmp_path / "xl" / "model_index.json").read_text())["_class_name"] == "EIUPXLPipeline"
    assert isinstance(models.load_pipeline(tmp_path / "xl"), EIUPXLPipeline)
    tiny_pipeline("sd2", tmpdir=tmp_path / "tok").save_pretrained(tmp_path / "sd2", safe_serialization=True)
    assert isinstance(models.load_pipeline(tmp_path / "sd2"), EIUPPipeline)


def test_fp16_variant_only_folder(sd1_dir, tmp_path):
    folder = copy_of(sd1_dir, tmp_path / "v")
    for comp in ("unet", "vae", "text_encoder"):
        for f in (folder / comp).glob("*.safetensors"):
            f.rename(f.with_name(f.name.replace(".safetensors", ".fp16.safetensors")))
    assert models.inspect_model(folder).variant == "fp16"
    assert models.load_pipeline(folder).unet.dtype == torch.float32


def test_refuses_pickled_weights_without_unpickling(sd1_dir, tmp_path):
    folder = copy_of(sd1_dir, tmp_path / "pickled")
    marker = tmp_path / "pwned"
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    plant_pickle(folder / "unet" / "diffusion_pytorch_model.bin", marker)
    with pytest.raises(models.UnsafeWeightsError) as err:
        models.load_pipeline(folder)
    msg = str(err.value)
    assert "pickled" in msg and "execute arbitrary code" in msg
    assert "save_pretrained('OUT_DIR', safe_serialization=True)" in msg  # how to convert
    assert not marker.exists()


def test_refuses_single_pickled_checkpoint(tmp_path):
    ckpt = tmp_path / "sd-v1-4.ckpt"
    marker = tmp_path / "pwned"
    plant_pickle(ckpt, marker)
    with pytest.raises(models.UnsafeWeightsError, match="single pickled checkpoint"):
        models.load_pipeline(ckpt)
    with pytest.raises(models.NotAPipelineError, match="no model_index.json.*pickled checkpoint.*arbitrary code"):
        models.load_pipeline(tmp_path)  # the folder holding it: not a pipeline, and says why
    assert not marker.exists()
    pickle.loads(ckpt.read_bytes())  # the trap was live: unpickling it does run code
    assert marker.exists()


def test_refuses_non_pipeline_folders(tmp_path, sd1_dir):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(models.NotAPipelineError, match="no model_index.json"):
        models.load_pipeline(tmp_path)
    with pytest.raises(models.NotAPipelineError, match="not a diffusers pipeline folder"):
        models.inspect_model(tmp_path / "notes.txt")

    folder = copy_of(sd1_dir, tmp_path / "flux")
    edit_json(folder / "model_index.json", _class_name="FluxPipeline")
    with pytest.raises(models.UnsupportedModelError, match="FluxPipeline is not supported.*StableDiffusionPipeline"):
        models.inspect_model(folder)

    folder = copy_of(sd1_dir, tmp_path / "broken")
    shutil.rmtree(folder / "vae")
    with pytest.raises(models.NotAPipelineError, match="vae/ is missing"):
        models.inspect_model(folder)

    (folder / "model_index.json").write_text("{not json")
    with pytest.raises(models.NotAPipelineError, match="unreadable model_index.json"):
        models.inspect_model(folder)


def test_never_runs_code_from_the_model_folder(sd1_dir, tmp_path):
    marker = tmp_path / "ran"
    folder = copy_of(sd1_dir, tmp_path / "custom")
    (folder / "my_unet.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass MyUNet: pass\n")
    (folder / "pipeline.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    edit_json(folder / "model_index.json", unet=["my_unet", "MyUNet"])
    with pytest.raises(models.UnsafeWeightsError, match="custom code"):
        models.load_pipeline(folder)
    edit_json(folder / "model_index.json", unet=["diffusers", "UNet2DConditionModel"],
              _class_name=["pipeline", "StableDiffusionPipeline"])
    with pytest.raises(models.UnsafeWeightsError, match="custom pipeline"):
        models.load_pipeline(folder)
    assert not marker.exists()


def test_unet_without_cross_attention(sd1_dir, tmp_path):
    folder = copy_of(sd1_dir, tmp_path / "nocross")
    edit_json(folder / "unet" / "config.json", down_block_types=["DownBlock2D"] * 3,
              up_block_types=["UpBlock2D"] * 3, mid_block_type="UNetMidBlock2D")
    with pytest.raises(models.UnsupportedModelError, match="no cross-attention"):
        models.inspect_model(folder)


def test_missing_paths_and_offline_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    with pytest.raises(models.ModelNotFoundError, match="no such folder.*--model /path/to/stable-diffusion-v1-5"):
        models.inspect_model(tmp_path / "nope")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(models.ModelNotFoundError) as err:
        models.load_pipeline("someone/some-sd-model")
    msg = str(err.value)
    assert "could not be fetched from the Hugging Face hub" in msg
    assert "--model /path/to/stable-diffusion-v1-5" in msg


def test_cached_hub_model_loads_offline(sd1_dir, tmp_path, monkeypatch):
    """A hub id already in the local cache loads without any network access."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hub-cache"
    snap = cache / "models--someone--tiny-sd" / "snapshots" / ("0" * 40)
    shutil.copytree(sd1_dir, snap)
    (cache / "models--someone--tiny-sd" / "refs").mkdir()
    (cache / "models--someone--tiny-sd" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    info = models.inspect_model("someone/tiny-sd")
    assert (info.source, info.cached) == ("hub", True)
    assert models.load_pipeline(info).unet.dtype == torch.float32


def test_default_model(monkeypatch, tmp_path):
    import eiup

    assert models.default_model_path() == Path(eiup.__file__).resolve().parent / "toy" / "weights" / "pipeline"
    monkeypatch.setattr(models, "default_model_path", lambda: tmp_path / "missing")
    with pytest.raises(models.ModelNotFoundError, match="bundled toy model is missing.*--model /path/to"):
        models.load_pipeline(None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_requested_without_cuda(sd1_dir):
    with pytest.raises(models.ModelLoadError, match="CUDA is not available"):
        models.load_pipeline(sd1_dir, device="cuda")
    assert models.default_device() == "cpu" and models.default_dtype("cpu") == torch.float32
    assert models.default_dtype("cuda") == torch.float16
