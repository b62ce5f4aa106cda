"""Shared fixtures: tiny randomly initialised pipelines (built once per session)."""

from __future__ import annotations

import pytest
import torch

from eiup.testing import tiny_pipeline

# Tiny models on a shared 2-core machine: one intra-op thread is ~10x faster than oversubscribing.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def bundled_latent_widths() -> tuple[int, int]:
    """The bundled toy model's latent channels and another width (for runs into another latent space)."""
    import json

    from eiup.models import default_model_path

    own = json.loads((default_model_path() / "vae" / "config.json").read_text())["latent_channels"]
    return own, 4 if own != 4 else 8


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def sd1(tiny_dir):
    """EIUPPipeline with tiny SD 1.x weights."""
    return tiny_pipeline("sd1", seed=0, tmpdir=tiny_dir)


@pytest.fixture(scope="session")
def sd1_plain(sd1):
    """Plain diffusers StableDiffusionPipeline sharing ``sd1``'s modules."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**sd1.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def sd1_other(tiny_dir):
    """A second, independent tiny SD 1.x EIUPPipeline (other weights)."""
    return tiny_pipeline("sd1", seed=1, tmpdir=tiny_dir)


@pytest.fixture(scope="session")
def sd2(tiny_dir):
    return tiny_pipeline("sd2", seed=0, tmpdir=tiny_dir)


@pytest.fixture(scope="session")
def sdxl(tiny_dir):
    return tiny_pipeline("sdxl", seed=0, tmpdir=tiny_dir)


@pytest.fixture(scope="session")
def sdxl_plain(sdxl):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**sdxl.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe



@pytest.fixture
def model_folder(sd1, tmp_path):
    """Point the session pipeline at a folder of this test's own (eiup_anchors.json, prompt probes)."""
    old = getattr(sd1.config, "_name_or_path", None)
    sd1.register_to_config(_name_or_path=str(tmp_path))
    yield tmp_path
    sd1.register_to_config(_name_or_path=old)
