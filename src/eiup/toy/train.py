"""Train the toy-world Stable Diffusion pipeline from scratch on this CPU, in resumable stages.

Stages (each skipped when its output exists; training stages resume from checkpoints):
  [init: with init_from, the given pipeline's VAE, its tokenizer checked] -> data (or data_from's) -> vae -> latents
  -> decoder (the VAE's decoder fine-tuned on its own latents, encoder frozen)
  -> unet (UNet + text encoder, with a token-localisation loss; with init_from, from the pipeline's weights;
     with unet_from, from another pipeline's weights carried into this run's latent space by ``transfer``) -> export.

The localisation loss (as in TokenCompose, arXiv 2312.03626) asks each object word's
cross-attention to fall inside its object's region, so that the toy model localises concepts in
its cross-attention maps the way Stable Diffusion does; EIUP relies on that property.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..io import cached_npz, replace_dir, write_json_atomic
from .presets import write_anchor_file
from .render import render
from .tokenizer import build_clip_tokenizer
from .world import Scene, caption_words, filler_tail, random_scene, words


@dataclass
class ToyTrainConfig:
    image_size: int = 64
    n_scenes: int = 60_000
    seed: int = 0
    vae_minutes: float = 8.0
    vae_batch: int = 32
    vae_crop: int = 32  # train the (fully convolutional) VAE on random crops: 4x cheaper per image
    vae_mark_weight: float = 0.0  # extra loss on the pattern marks' pixels: the latents keep dots (docs/experiments/dots.md)
    decoder_minutes: float = 0.0  # then fine-tune the decoder alone on whole images (docs/experiments/decoder.md)
    unet_minutes: float = 80.0
    unet_batch: int = 64
    lr: float = 3e-4
    caption_dropout: float = 0.1
    long_caption_prob: float = 0.1  # captions padded with style words, often past 77 tokens (then truncated)
    localisation_weight: float = 0.03
    ema_decay: float = 0.999
    checkpoint_minutes: float = 5.0
    threads: int = 2
    device: str = "cpu"  # "cuda" trains the VAE and the UNet there (data, checkpoints and export stay on the CPU)
    init_from: str | None = None  # a toy pipeline folder: keep its VAE, start the UNet and text encoder from its weights
    latent_channels: int = 4  # SD 1.x's 4; more keep finer detail through the 8x compression (SD3 has 16)
    unet_from: str | None = None  # a toy pipeline folder whose UNet and text encoder start this run's (own VAE)
    patterned_weight: float = 1.0  # how much more often UNet batches draw scenes with a striped or dotted object
    snr_gamma: float = 5.0  # Min-SNR loss weighting; inf = the plain noise-prediction loss (every timestep alike)
    data_from: str | None = None  # another run's work folder: reuse its rendered scenes (and latents, if same VAE)


# ---------------------------------------------------------------- architecture

def build_text_encoder(vocab_size: int, bos: int, eos: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=64,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
    )
    return CLIPTextModel(cfg)


def build_vae(latent_channels: int = 4):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, sample_size=64, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64), norm_num_groups=4,  # >= 4 channels per group keeps colour
    )


def build_unet(latent_channels: int = 4):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=latent_channels, out_channels=latent_channels, layers_per_block=1, block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=4, norm_num_groups=32,
    )


def build_noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, steps_offset=1,
    )


# ---------------------------------------------------------------- data

def _render_one(args):
    seed, size, with_marks = args
    scene = random_scene(random.Random(seed))
    r = render(scene, size)
    masks = np.zeros((3, size, size), dtype=np.float32)
    for k, m in enumerate(r.masks):
        masks[k] = m
    masks[2] = 1.0 - np.clip(sum(r.masks), 0, 1)  # background region
    pooled = masks.reshape(3, 8, size // 8, 8, size // 8).mean(axis=(2, 4))
    marks = (r.marks * 255).round().astype(np.uint8) if with_marks else None
    return r.image, pooled.astype(np.float16), scene_to_json(scene), marks


def scene_to_json(scene: Scene) -> dict:
    return {
        "objects": [{"color": o.color, "shape": o.shape, "pattern": o.pattern, "noun": o.noun} for o in scene.objects],
        "background": scene.background,
        "layout_seed": scene.layout_seed,
    }


def scene_from_json(d: dict) -> Scene:
    from .world import Obj

    return Scene(tuple(Obj(**o) for o in d["objects"]), d["background"], d["layout_seed"])


def render_dataset(n: int, seed: int, size: int, processes: int = 2, desc: str = "render", with_marks: bool = False):
    """Render n random scenes: images (n,H,W,3) uint8, region masks at 8x8 (n,3,8,8), scene dicts; with
    `with_marks` also their pattern marks (n,H,W) uint8 (`Rendered.marks` x 255)."""
    seeds = [(seed * 1_000_003 + i, size, with_marks) for i in range(n)]
    with Pool(processes) as pool:
        results = list(tqdm(pool.imap(_render_one, seeds, chunksize=64), total=n, desc=desc))
    images = np.stack([r[0] for r in results])
    masks = np.stack([r[1] for r in results])
    scenes = [r[2] for r in results]
    return (images, masks, scenes, np.stack([r[3] for r in results])) if with_marks else (images, masks, scenes)


def check_data_from(folder: Path, cfg: ToyTrainConfig) -> None:
    """``data_from`` must hold a finished data stage of the run's size, before any work."""
    missing = [name for name in ("images.npy", "masks8.npy", "scenes.json") if not (folder / "data" / name).exists()]
    if missing:
        raise ValueError(f"data_from: {folder} holds no rendered scenes (no data/{', data/'.join(missing)}); pass the "
                         "work folder of a run whose data stage finished")
    n = len(json.loads((folder / "data" / "scenes.json").read_text()))
    if n != cfg.n_scenes:
        raise ValueError(f"data_from: {folder} holds {n} scenes, not n_scenes={cfg.n_scenes}; pass n_scenes={n}")
    size = np.load(folder / "data" / "images.npy", mmap_mode="r").shape[1]
    if size != cfg.image_size:
        raise ValueError(f"data_from: {folder}'s images are {size}x{size}, not image_size={cfg.image_size}")


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes a hard link to ``src`` (a copy across file systems), written atomically."""
    import os
    import shutil

    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    tmp.replace(dst)


def same_vae_weights(a: Path, b: Path) -> bool:
    """Whether two runs' ``vae_final.safetensors`` hold the same tensors (latents of one are then the other's)."""
    if not (a.exists() and b.exists()):
        return False
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def stage_data(out: Path, cfg: ToyTrainConfig) -> None:
    data = out / "data"
    if (data / "scenes.json").exists():
        return
    data.mkdir(parents=True, exist_ok=True)
    if cfg.data_from:  # scenes.json last: it marks the stage done
        theirs = Path(cfg.data_from) / "data"
        for name in ("images.npy", "masks8.npy", "marks.npy", "scenes.json"):
            if (theirs / name).exists():
                link_or_copy(theirs / name, data / name)
        return
    rendered = render_dataset(cfg.n_scenes, cfg.seed, cfg.image_size, cfg.threads, with_marks=cfg.vae_mark_weight > 0)
    images, masks, scenes = rendered[:3]
    if cfg.vae_mark_weight > 0:  # else stage_marks renders them when a later run asks
        np.save(data / "marks.npy", rendered[3])
    np.save(data / "images.npy", images)
    np.save(data / "masks8.npy", masks)
    write_json_atomic(data / "scenes.json", scenes, indent=None)  # last: it marks the stage done


# ---------------------------------------------------------------- checkpoints (safetensors only)

def save_checkpoint(path: Path, modules: dict, optimizer: torch.optim.Optimizer, meta: dict) -> None:
    tensors = {}
    for name, module in modules.items():
        for k, v in module.state_dict().items():
            tensors[f"{name}.{k}"] = v.detach().to("cpu", copy=True).contiguous()
    opt_state = optimizer.state_dict()
    for idx, st in opt_state["state"].items():
        for k, v in st.items():
            tensors[f"optim.{idx}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).to("cpu", copy=True).contiguous()
    meta = dict(meta, param_groups=opt_state["param_groups"])
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})
    tmp.replace(path)


def _checkpoint_meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["meta"])


def load_checkpoint(path: Path, modules: dict, optimizer: torch.optim.Optimizer) -> dict:
    tensors = load_file(str(path))
    meta = _checkpoint_meta(path)
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
    return meta


class EMA:
    """Exponential moving average of parameters (with the usual warm-up)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = module
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in self.module.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v, alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self):
        return self.shadow

    def load_state_dict(self, sd):
        device = next(iter(self.module.state_dict().values())).device
        self.shadow = {k: v.to(device, copy=True) for k, v in sd.items()}


# ---------------------------------------------------------------- VAE

def gradient_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 between image gradients: keeps edges, stripes and dots sharp through the 8x compression."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return F.l1_loss(dx(a), dx(b)) + F.l1_loss(dy(a), dy(b))


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, colour_weight: float = 0.0) -> torch.Tensor:
    """MSE + L1 + image-gradient L1; `colour_weight` adds L1 between 4x4-pooled images (the object's colour)."""
    loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + gradient_loss(rec, x)
    if colour_weight:
        loss = loss + colour_weight * F.l1_loss(F.avg_pool2d(rec, 4), F.avg_pool2d(x, 4))
    return loss


def marks_weighted_mse(rec: torch.Tensor, x: torch.Tensor, marks: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels, averaged over the marks' pixels and their 1-pixel rims.

    `marks` (B, 1, H, W) is the coverage by dots and stripes (`Rendered.marks`); an image without
    marks adds nothing. Small dots are a few pixels of a 64x64 image, so the plain loss hardly sees them.
    """
    weight = F.max_pool2d(marks, 3, stride=1, padding=1)
    return ((rec - x) ** 2 * weight).sum() / weight.sum().clamp_min(1.0)


def bare_object_pixels(x: torch.Tensor, marks: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) 1 on the objects' pixels away from any dot or stripe: where a decoder must draw no marks.

    An object's pixels are those differing from the image's border's median colour (the plain background) by
    more than 0.15 summed over channels (images in [-1, 1]); `marks` is as in :func:`marks_weighted_mse`.
    """
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], -1)
    objects = ((x - border.median(-1).values[..., None, None]).abs().sum(1, keepdim=True) > 0.15).float()
    return objects * (1 - F.max_pool2d(marks, 3, stride=1, padding=1))


def bare_weighted_mse(rec: torch.Tensor, x: torch.Tensor, marks: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels, averaged over :func:`bare_object_pixels`: marks drawn where an object
    has none (a plain object's blotches) cost as much as :func:`marks_weighted_mse`'s lost marks."""
    weight = bare_object_pixels(x, marks)
    return ((rec - x) ** 2 * weight).sum() / weight.sum().clamp_min(1.0)


def _marks_one(args) -> np.ndarray:
    scene_json, size = args
    return (render(scene_from_json(scene_json), size).marks * 255).round().astype(np.uint8)


def stage_marks(out: Path, cfg: ToyTrainConfig) -> None:
    """data/marks.npy: each training image's pattern-mark coverage (uint8), rendered again from its scene when the
    data was rendered without them (a run started without a mark weight)."""
    path = out / "data" / "marks.npy"
    if cfg.vae_mark_weight <= 0 or path.exists() or (out / "vae_final.safetensors").exists():
        return
    scenes = json.loads((out / "data" / "scenes.json").read_text())
    with Pool(cfg.threads) as pool:
        marks = list(tqdm(pool.imap(_marks_one, [(d, cfg.image_size) for d in scenes], chunksize=64),
                          total=len(scenes), desc="render marks"))
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, np.stack(marks))
    tmp.replace(path)


def stage_init(out: Path, cfg: ToyTrainConfig) -> None:
    """With `init_from`: the run's VAE is the pipeline's (so its latents, and the UNet trained on them, keep their
    meaning) and the run's tokenizer must give the pipeline's token ids (also ``unet_from``'s, before any work)."""
    final = out / "vae_final.safetensors"
    if cfg.unet_from:
        check_toy_tokenizer(Path(cfg.unet_from), out, "unet_from")
    if not cfg.init_from:
        return
    from diffusers import AutoencoderKL

    folder = Path(cfg.init_from)
    check_toy_tokenizer(folder, out, "init_from")
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32, use_safetensors=True)
    if final.exists():  # a resumed run: it must be this pipeline's VAE, or the UNet's latents would change meaning
        kept = load_file(str(final))
        if any(not torch.equal(kept[k], v) for k, v in vae.state_dict().items()):
            raise ValueError(f"{out} already holds a run with another VAE than {folder}'s; "
                             "train on from a pipeline in a fresh work folder")
        return
    tmp = final.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(tmp),
              metadata={"scaling_factor": str(vae.config.scaling_factor), "init_from": str(folder)})
    tmp.replace(final)


def check_toy_tokenizer(folder: Path, out: Path, option: str) -> None:
    """A pipeline whose weights start this run must give the run's token ids."""
    from transformers import CLIPTokenizer

    theirs, ours = CLIPTokenizer.from_pretrained(folder / "tokenizer"), CLIPTokenizer.from_pretrained(out / "tokenizer")
    if theirs.get_vocab() != ours.get_vocab():
        raise ValueError(f"{folder / 'tokenizer'} is not the toy world's tokenizer; {option} takes a toy pipeline")


def load_pipeline_weights(folder: Path, unet: torch.nn.Module, text: torch.nn.Module,
                          translate=None, option: str = "init_from") -> None:
    """Copy a toy pipeline folder's UNet and text-encoder weights (safetensors) into the training modules;
    ``translate`` (UNet state dict -> state dict) first, where the UNet changes latent space."""
    for module, name in ((unet, "unet/diffusion_pytorch_model.safetensors"), (text, "text_encoder/model.safetensors")):
        tensors = load_file(str(Path(folder) / name))
        if module is unet and translate is not None:
            tensors = translate(tensors)
        ref = module.state_dict()
        missing = sorted(set(ref) - set(tensors))
        wrong = sorted(k for k in set(ref) & set(tensors) if tensors[k].shape != ref[k].shape)
        if missing or wrong:
            example = (missing or wrong)[0]
            raise ValueError(f"{Path(folder) / name} lacks {len(missing)} tensors of the toy architecture and has "
                             f"{len(wrong)} of other shapes (e.g. {example}); {option} takes a toy pipeline")
        module.load_state_dict({k: tensors[k].to(ref[k].dtype) for k in ref})


@torch.no_grad()
def transfer_translation(folder: Path, out: Path, scaling: float, n_images: int = 2000):
    """The function that carries ``folder``'s UNet into this run's latent space (``transfer``): a least-squares
    map fitted between both VAEs' latents of the run's first renders."""
    from diffusers import AutoencoderKL

    from .transfer import transfer_unet_weights

    images = np.load(out / "data" / "images.npy", mmap_mode="r")[:n_images]
    channels = _saved_latent_channels(out / "vae_final.safetensors")
    ours = torch.from_numpy(np.load(out / "data" / "latents.npy", mmap_mode="r")[:n_images, :channels].astype(np.float32))
    their_vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32, use_safetensors=True).eval()
    theirs = []
    for i in range(0, len(images), 250):
        x = torch.from_numpy(np.array(images[i:i + 250])).permute(0, 3, 1, 2).float() / 127.5 - 1
        theirs.append(their_vae.encode(x).latent_dist.mean)
    their_latents = torch.cat(theirs) * their_vae.config.scaling_factor

    def translate(state: dict) -> dict:
        translated, r2 = transfer_unet_weights(state, ours * scaling, their_latents)
        print(f"unet_from {folder}: {their_latents.shape[1]} -> {channels} latent channels, "
              f"the map explains {100 * r2:.1f}% of their latents' variance")
        return translated

    return translate


def _saved_latent_channels(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        key = next(k for k in f.keys() if k.endswith("quant_conv.weight") and not k.endswith("post_quant_conv.weight"))
        return f.get_slice(key).get_shape()[0] // 2


def check_latent_channels(out: Path, cfg: ToyTrainConfig) -> None:
    """Refuse to resume a from-scratch run whose VAE (final or checkpoint) has other latent channels than asked."""
    if not 1 <= cfg.latent_channels <= 64:
        raise ValueError(f"latent_channels must be in 1..64, got {cfg.latent_channels}")
    for path in (out / "vae_final.safetensors", out / "vae_ckpt.safetensors"):
        if cfg.init_from or not path.exists():
            continue
        have = _saved_latent_channels(path)
        if have != cfg.latent_channels:
            raise ValueError(f"{out} holds a VAE with {have} latent channels, not {cfg.latent_channels}; "
                             f"resume it with latent_channels={have} (--latent-channels {have}) or use a fresh work folder")


@torch.no_grad()
def latent_scaling_factor(vae, images: np.ndarray, device: str = "cpu") -> float:
    """1 / the spread of the first 512 images' latent means: unit-variance latents, as SD's 0.18215."""
    x = torch.from_numpy(np.asarray(images[:512])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return 1.0 / vae.encode(x.to(device)).latent_dist.mean.std().item()


def stage_vae(out: Path, cfg: ToyTrainConfig) -> None:
    final = out / "vae_final.safetensors"
    if final.exists():
        return
    torch.manual_seed(cfg.seed)
    images = np.load(out / "data" / "images.npy", mmap_mode="r")
    marks = np.load(out / "data" / "marks.npy", mmap_mode="r") if cfg.vae_mark_weight > 0 else None
    vae = build_vae(cfg.latent_channels).to(cfg.device)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    ckpt = out / "vae_ckpt.safetensors"
    meta = {"step": 0, "seconds": 0.0}
    if ckpt.exists():
        meta = load_checkpoint(ckpt, {"vae": vae}, opt)
    rng = np.random.default_rng(cfg.seed + meta["step"])
    budget = cfg.vae_minutes * 60
    last_ckpt = time.time()
    bar = tqdm(total=int(budget), desc="vae (s)", initial=int(meta["seconds"]))
    while meta["seconds"] < budget:
        t0 = time.time()
        idx = np.sort(rng.choice(len(images), cfg.vae_batch, replace=False))
        x = torch.from_numpy(np.asarray(images[idx])).permute(0, 3, 1, 2).float() / 127.5 - 1
        m = torch.from_numpy(np.asarray(marks[idx]))[:, None].float() / 255 if marks is not None else None
        if cfg.vae_crop < x.shape[-1]:
            oy, ox = (int(v) for v in rng.integers(0, x.shape[-1] - cfg.vae_crop + 1, 2) // 8 * 8)
            x = x[:, :, oy:oy + cfg.vae_crop, ox:ox + cfg.vae_crop]
            m = m[:, :, oy:oy + cfg.vae_crop, ox:ox + cfg.vae_crop] if m is not None else None
        x = x.to(cfg.device)
        lr = 1e-3 * 0.5 * (1 + math.cos(math.pi * min(1.0, meta["seconds"] / budget))) + 2e-5
        for g in opt.param_groups:
            g["lr"] = lr
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = reconstruction_loss(rec, x) + 1e-6 * post.kl().mean()
        if m is not None:
            loss = loss + cfg.vae_mark_weight * marks_weighted_mse(rec, x, m.to(cfg.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        meta["step"] += 1
        dt = time.time() - t0
        meta["seconds"] += dt
        bar.update(int(meta["seconds"]) - bar.n)
        bar.set_postfix(loss=f"{loss.item():.4f}", step=meta["step"])
        if time.time() - last_ckpt > cfg.checkpoint_minutes * 60:
            save_checkpoint(ckpt, {"vae": vae}, opt, meta)
            last_ckpt = time.time()
    bar.close()
    # latent statistics set the scaling factor, as SD's 0.18215
    std = 1.0 / latent_scaling_factor(vae, images, cfg.device)
    vae.cpu().register_to_config(scaling_factor=1.0 / std)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(final),
              metadata={"scaling_factor": str(1.0 / std), "meta": json.dumps(meta)})


def load_vae(out: Path, finetuned_decoder: bool = True):
    """The run's VAE; with the fine-tuned decoder once the decoder stage has written it."""
    from safetensors import safe_open

    path = out / "vae_final.safetensors"
    if finetuned_decoder and (out / "vae_decoder_final.safetensors").exists():
        path = out / "vae_decoder_final.safetensors"
    vae = build_vae(_saved_latent_channels(path))
    vae.load_state_dict(load_file(str(path)))
    with safe_open(str(path), "pt") as f:
        vae.register_to_config(scaling_factor=float(f.metadata()["scaling_factor"]))
    return vae.eval()


@torch.no_grad()
def encode_latent_stats(vae, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """Posterior mean and std of each uint8 image, concatenated on channels: (N, 2 * 4, h, w) float16."""
    chunks = []
    device = next(vae.parameters()).device
    for i in tqdm(range(0, len(images), batch), desc="encode"):
        x = torch.from_numpy(np.asarray(images[i:i + batch])).permute(0, 3, 1, 2).float() / 127.5 - 1
        dist = vae.encode(x.to(device)).latent_dist
        chunks.append(torch.cat([dist.mean, dist.std], 1).cpu().numpy().astype(np.float16))
    return np.concatenate(chunks)


def stage_latents(out: Path, cfg: ToyTrainConfig) -> None:
    path = out / "data" / "latents.npy"
    if path.exists():
        return
    if cfg.data_from and same_vae_weights(Path(cfg.data_from) / "vae_final.safetensors", out / "vae_final.safetensors"):
        theirs = Path(cfg.data_from) / "data" / "latents.npy"
        if theirs.exists():
            link_or_copy(theirs, path)
            return
    images = np.load(out / "data" / "images.npy", mmap_mode="r")
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, encode_latent_stats(load_vae(out, finetuned_decoder=False).to(cfg.device), images))
    tmp.replace(path)


@dataclass
class DecoderFinetune:
    """What `finetune_decoder` did: steps, seconds of steps, and held-out PSNR (dB) before and after."""

    steps: int
    seconds: float
    psnr_before: float
    psnr_after: float


def _batch(images: np.ndarray, stats: np.ndarray, idx: np.ndarray, g: torch.Generator, latent_noise: float = 0.0):
    x = torch.from_numpy(np.asarray(images[idx])).permute(0, 3, 1, 2).float() / 127.5 - 1
    st = torch.from_numpy(np.asarray(stats[idx])).float()
    mean, std = st.chunk(2, dim=1)
    z = mean + std * torch.randn(mean.shape, generator=g)
    if latent_noise:  # an amplitude per image, uniform in [0, latent_noise)
        z = z + latent_noise * torch.rand(len(z), 1, 1, 1, generator=g) * torch.randn(z.shape, generator=g)
    return x, z


@torch.no_grad()
def decoder_psnr(vae, images: np.ndarray, stats: np.ndarray, seed: int = 0, batch: int = 250) -> float:
    """PSNR (dB, 8-bit) of images decoded from sampled latents, as a generated latent is decoded."""
    g = torch.Generator().manual_seed(seed)
    se = 0.0
    for i in range(0, len(images), batch):
        x, z = _batch(images, stats, np.arange(i, min(i + batch, len(images))), g)
        se += ((vae.decode(z).sample.clamp(-1, 1) - x) * 127.5).pow(2).sum().item()
    return 10 * math.log10(255**2 / (se / (len(images) * x[0].numel())))


def _cosine_steps(meta: dict, budget_s: float, opt: torch.optim.Optimizer, lr: float, step_loss, desc: str,
                  checkpoint: Path | None, modules: dict, max_steps: int | None = None,
                  checkpoint_minutes: float = 5.0) -> None:
    """Optimise `step_loss()` until `budget_s` seconds of steps (or `max_steps`): cosine learning rate from `lr`,
    `meta` (step, seconds) updated, a checkpoint every `checkpoint_minutes` and at the end."""
    last_ckpt = time.time()
    bar = tqdm(total=int(budget_s), desc=desc, initial=int(min(meta["seconds"], budget_s)))
    while meta["seconds"] < budget_s and (max_steps is None or meta["step"] < max_steps):
        t0 = time.time()
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(1.0, meta["seconds"] / budget_s))) + 1e-6
        loss = step_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        meta["step"] += 1
        meta["seconds"] += time.time() - t0
        bar.update(int(min(meta["seconds"], budget_s)) - bar.n)
        bar.set_postfix(loss=f"{loss.item():.4f}", step=meta["step"])
        if checkpoint is not None and time.time() - last_ckpt > checkpoint_minutes * 60:
            save_checkpoint(checkpoint, modules, opt, meta)
            last_ckpt = time.time()
    bar.close()
    if checkpoint is not None:
        save_checkpoint(checkpoint, modules, opt, meta)


def finetune_decoder(vae, images: np.ndarray, stats: np.ndarray, minutes: float, checkpoint: Path | None = None,
                     seed: int = 0, batch: int = 32, lr: float = 3e-4, colour_weight: float = 2.0,
                     n_eval: int | None = None, checkpoint_minutes: float = 5.0,
                     max_steps: int | None = None, latent_noise: float = 0.0) -> DecoderFinetune:
    """Fine-tune the VAE's decoder alone, in place, on whole images decoded from sampled latents.

    The encoder stays fixed, so the latent space (and a UNet trained in it) is unchanged, as with
    Stable Diffusion's ft-MSE VAE. The last `n_eval` images (default a tenth, at most 500) are held
    out to measure PSNR. `stats` are `encode_latent_stats(vae, images)`. Stops after `minutes` of
    steps or `max_steps` steps; resumes from `checkpoint` when it exists. `latent_noise` adds
    Gaussian noise of a random amplitude below it to the training latents, so that the decoder
    learns to draw off-manifold latents (a UNet's) smoothly; PSNR is measured without it.
    """
    if not (math.isfinite(latent_noise) and latent_noise >= 0):
        raise ValueError(f"latent_noise must be a finite number >= 0, got {latent_noise}")
    if n_eval is None:
        n_eval = min(500, len(images) // 10)
    if not len(images) > n_eval + batch:
        raise ValueError(f"finetune_decoder needs more than {n_eval + batch} images, got {len(images)}")
    n_train = len(images) - n_eval
    held = (images[n_train:], stats[n_train:])
    vae.requires_grad_(False)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    meta = {"step": 0, "seconds": 0.0}
    if checkpoint is not None and checkpoint.exists():
        meta = load_checkpoint(checkpoint, {"vae": vae}, opt)
    meta.setdefault("psnr_before", decoder_psnr(vae.eval(), *held))
    vae.train()
    rng = np.random.default_rng(seed + meta["step"])
    g = torch.Generator().manual_seed(seed + meta["step"])

    def step_loss() -> torch.Tensor:
        x, z = _batch(images, stats, np.sort(rng.choice(n_train, batch, replace=False)), g, latent_noise)
        return reconstruction_loss(vae.decode(z).sample, x, colour_weight)

    _cosine_steps(meta, minutes * 60, opt, lr, step_loss, "decoder (s)", checkpoint, {"vae": vae}, max_steps,
                  checkpoint_minutes)
    vae.requires_grad_(False)
    return DecoderFinetune(meta["step"], meta["seconds"], meta["psnr_before"], decoder_psnr(vae.eval(), *held))


def write_vae(folder: Path, vae) -> None:
    """Replace the VAE folder atomically with `vae`, in the precision the folder's weights were stored in."""
    from safetensors import safe_open

    with safe_open(str(folder / "diffusion_pytorch_model.safetensors"), "pt") as f:
        stored = f.get_slice(next(iter(f.keys()))).get_dtype()
    dtype = {"F16": torch.float16, "BF16": torch.bfloat16}.get(stored, torch.float32)

    def write(tmp: Path) -> None:
        vae.to(dtype).save_pretrained(tmp, safe_serialization=True)
        config = json.loads((tmp / "config.json").read_text())
        config.pop("_name_or_path", None)  # where it was loaded from: a path of this machine
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    replace_dir(folder, write)


def finetune_pipeline_decoder(model: str | Path, minutes: float, scenes: int = 24_000, seed: int = 91,
                              work: str | Path = "runs/decoder", latent_noise: float = 0.0) -> DecoderFinetune:
    """`finetune_decoder` on a pipeline folder's VAE, written back in place in the folder's own precision.

    Renders `scenes` scenes (the last ones measure PSNR) and keeps them, encoded, in `work` with the
    checkpoint, so a rerun resumes. Both are keyed by the VAE's encoder (the latent space, which the
    fine-tuning leaves alone: a rerun on the written-back folder resumes) and the settings; another
    model or `latent_noise` starts afresh.
    """
    import hashlib

    from diffusers import AutoencoderKL

    folder, work = Path(model) / "vae", Path(work)
    vae = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32, use_safetensors=True)
    encoder = hashlib.sha1()
    for name, tensor in sorted({**vae.encoder.state_dict(), **vae.quant_conv.state_dict()}.items()):
        encoder.update(name.encode() + tensor.numpy().tobytes())
    key = f"{scenes}-{seed}-{encoder.hexdigest()[:12]}"

    def make() -> dict:
        images, _, _ = render_dataset(scenes, seed, 64, desc="render (decoder)")
        return {"images": images, "stats": encode_latent_stats(vae, images)}

    data = cached_npz(work / f"data-{key}.npz", make)
    result = finetune_decoder(vae, data["images"], data["stats"], minutes, seed=seed, latent_noise=latent_noise,
                              checkpoint=work / f"decoder-{key}-noise{latent_noise:g}.safetensors")

    write_vae(folder, vae)
    return result


@torch.no_grad()
def vae_psnr(vae, images: np.ndarray, batch: int = 250) -> float:
    """PSNR (dB, 8-bit) of images through the VAE, posterior mean decoded."""
    se = 0.0
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.asarray(images[i:i + batch])).permute(0, 3, 1, 2).float() / 127.5 - 1
        se += ((vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1) - x) * 127.5).pow(2).sum().item()
    return 10 * math.log10(255**2 / (se / (len(images) * x[0].numel())))


def finetune_vae(vae, images: np.ndarray, marks: np.ndarray, minutes: float, mark_weight: float = 4.0,
                 checkpoint: Path | None = None, seed: int = 0, batch: int = 32, lr: float = 2e-4,
                 n_eval: int | None = None, checkpoint_minutes: float = 5.0,
                 max_steps: int | None = None, bare_weight: float = 0.0,
                 decoder_only: bool = False) -> DecoderFinetune:
    """Fine-tune the whole VAE (encoder too), in place, with `mark_weight` x `marks_weighted_mse` (and
    `bare_weight` x `bare_weighted_mse`: no marks drawn where there are none) on top of its loss.

    The latents move, so a UNet trained on the old ones must be trained on in the new space, and
    detectors retrained through it; with `decoder_only` the encoder stays as it is, and with it the
    latents, their scaling factor and what a UNet trained on them draws. `marks` (N, H, W) uint8 are
    `Rendered.marks` x 255. The last `n_eval` images (default a tenth, at most 500) measure PSNR. Resumes
    from `checkpoint`; the scaling factor is re-estimated at the end (whole VAE), as the VAE stage sets it.
    """
    for name, value in (("mark_weight", mark_weight), ("bare_weight", bare_weight)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    n_eval = min(500, len(images) // 10) if n_eval is None else n_eval
    if not len(images) > n_eval + batch:
        raise ValueError(f"finetune_vae needs more than {n_eval + batch} images, got {len(images)}")
    n_train = len(images) - n_eval
    trained = [vae.decoder, vae.post_quant_conv] if decoder_only else [vae]
    opt = torch.optim.AdamW([p for module in trained for p in module.parameters()], lr=lr, weight_decay=0.0)
    meta = {"step": 0, "seconds": 0.0}
    if checkpoint is not None and checkpoint.exists():
        meta = load_checkpoint(checkpoint, {"vae": vae}, opt)
    vae.requires_grad_(False)
    for module in trained:
        module.requires_grad_(True)
    meta.setdefault("psnr_before", vae_psnr(vae.eval(), images[n_train:]))
    vae.train()
    rng = np.random.default_rng(seed + meta["step"])
    torch.manual_seed(seed + meta["step"])

    def step_loss() -> torch.Tensor:
        idx = np.sort(rng.choice(n_train, batch, replace=False))
        x = torch.from_numpy(np.asarray(images[idx])).permute(0, 3, 1, 2).float() / 127.5 - 1
        m = torch.from_numpy(np.asarray(marks[idx]))[:, None].float() / 255
        with torch.set_grad_enabled(not decoder_only):
            post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = reconstruction_loss(rec, x) + mark_weight * marks_weighted_mse(rec, x, m)
        if not decoder_only:
            loss = loss + 1e-6 * post.kl().mean()
        return loss + bare_weight * bare_weighted_mse(rec, x, m) if bare_weight else loss

    _cosine_steps(meta, minutes * 60, opt, lr, step_loss, "decoder (s)" if decoder_only else "vae (s)", checkpoint,
                  {"vae": vae}, max_steps, checkpoint_minutes)
    vae.requires_grad_(False).eval()
    if not decoder_only:
        vae.register_to_config(scaling_factor=latent_scaling_factor(vae, images))
    return DecoderFinetune(meta["step"], meta["seconds"], meta["psnr_before"], vae_psnr(vae, images[n_train:]))


def _vae_digest(vae) -> str:
    import hashlib

    digest = hashlib.sha1()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode() + tensor.float().numpy().tobytes())
    return digest.hexdigest()[:12]


def finetune_pipeline_vae(model: str | Path, minutes: float, scenes: int = 12_000, seed: int = 777,
                          work: str | Path = "runs/vae-marks", mark_weight: float = 4.0,
                          bare_weight: float = 0.0, decoder_only: bool = False) -> DecoderFinetune:
    """`finetune_vae` on a pipeline folder's VAE, written back in place (its precision; a new scaling factor
    unless `decoder_only`).

    Renders `scenes` scenes with their marks into `work` (kept for a rerun), with the checkpoint. A
    rerun resumes an unfinished fine-tune of the same VAE and leaves a finished one (the folder
    holding its result) alone; a work folder holding another VAE's fine-tune is refused.
    """
    from diffusers import AutoencoderKL

    folder, work = Path(model) / "vae", Path(work)
    vae = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32, use_safetensors=True)
    here = _vae_digest(vae)
    bare = f"-bare{bare_weight:g}" if bare_weight else ""
    part = "decoder" if decoder_only else "vae"
    checkpoint = work / f"{part}-{scenes}-{seed}-marks{mark_weight:g}{bare}.safetensors"
    record_path = checkpoint.with_suffix(".json")  # which VAE the fine-tune started from, and what it wrote
    record = json.loads(record_path.read_text()) if record_path.exists() else {"start": here}
    if record.get("result") == here:
        return DecoderFinetune(**record["finetune"])
    if record["start"] != here:
        raise ValueError(f"{work} holds a fine-tune of another VAE; pass another work folder")
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record_path, record)

    def make() -> dict:
        images, _, _, marks = render_dataset(scenes, seed, 64, desc="render (vae)", with_marks=True)
        return {"images": images, "marks": marks}

    data = cached_npz(work / f"data-{scenes}-{seed}.npz", make)
    result = finetune_vae(vae, data["images"], data["marks"], minutes, mark_weight, checkpoint=checkpoint, seed=seed,
                          bare_weight=bare_weight, decoder_only=decoder_only)

    write_vae(folder, vae)
    written = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32, use_safetensors=True)
    write_json_atomic(record_path, {"start": here, "result": _vae_digest(written), "finetune": asdict(result)})
    return result


def stage_decoder(out: Path, cfg: ToyTrainConfig) -> None:
    final = out / "vae_decoder_final.safetensors"
    if cfg.decoder_minutes <= 0 or final.exists():
        return
    vae = load_vae(out, finetuned_decoder=False)
    scaling = vae.config.scaling_factor
    images = np.load(out / "data" / "images.npy", mmap_mode="r")
    stats = np.load(out / "data" / "latents.npy", mmap_mode="r")
    result = finetune_decoder(vae, images, stats, cfg.decoder_minutes, checkpoint=out / "vae_decoder_ckpt.safetensors",
                              seed=cfg.seed)
    print(f"decoder: {result.steps} steps, held-out PSNR {result.psnr_before:.2f} -> {result.psnr_after:.2f} dB")
    tmp = final.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(tmp),
              metadata={"scaling_factor": str(scaling), "decoder": json.dumps(asdict(result))})
    tmp.replace(final)


# ---------------------------------------------------------------- UNet + text encoder

class RecordingCrossAttnProcessor:
    """Plain cross-attention that also records the head-averaged attention probabilities."""

    def __init__(self, store: list):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        b, n, _ = hidden_states.shape
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(q, k, None)
        self.store.append(probs.view(b, attn.heads, n, -1).mean(1))
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


def localisation_loss(maps: list[torch.Tensor], masks8: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-log(share of each object word's attention that falls inside its object's region)."""
    valid = labels >= 0  # (B, 77)
    if not valid.any():
        return masks8.new_zeros(())
    losses = []
    for a in maps:  # (B, N, 77)
        side = int(math.isqrt(a.shape[1]))
        m = masks8 if side == 8 else F.adaptive_avg_pool2d(masks8, side)
        m = m.flatten(2)  # (B, 3, N)
        region = torch.gather(m, 1, labels.clamp(min=0)[:, :, None].expand(-1, -1, m.shape[2]))  # (B, 77, N)
        inside = (a.transpose(1, 2) * region).sum(-1)
        share = inside / (a.sum(1) + 1e-8)
        losses.append(-torch.log(share[valid] + 1e-4).mean())
    return torch.stack(losses).mean()


def encode_captions(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def sample_batch(rng: random.Random, scenes: list[Scene], idx: np.ndarray, tokenizer, dropout: float,
                 long_prob: float = 0.0):
    texts, labels = [], torch.full((len(idx), 77), -1, dtype=torch.long)
    for row, i in enumerate(idx):
        if rng.random() < dropout:
            texts.append("")
            continue
        cw = caption_words(scenes[i], rng)
        tail = filler_tail(rng) if rng.random() < long_prob else ""
        texts.append(" ".join(w for w, _ in cw) + tail)
        for pos, (_, lab) in enumerate(cw):
            if lab >= 0 and pos + 1 < 77:
                labels[row, pos + 1] = min(lab, 2) if lab < len(scenes[i].objects) else 2
    return encode_captions(tokenizer, texts), labels


def scene_sampling_probabilities(scenes: list[Scene], patterned_weight: float) -> np.ndarray | None:
    """Probability of each scene in a UNet batch: ``patterned_weight`` times more for scenes holding a striped
    or dotted object; None (uniform, the default sampler) at weight 1."""
    if patterned_weight == 1:
        return None
    w = np.array([patterned_weight if any(o.pattern != "plain" for o in s.objects) else 1.0 for s in scenes])
    return w / w.sum()


def min_snr_weights(snr: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample weight of the noise-prediction loss, min(SNR, gamma) / SNR (Hang et al. 2023, Min-SNR, eq. 9)."""
    return torch.clamp(snr, max=gamma) / snr


def stage_unet(out: Path, cfg: ToyTrainConfig) -> None:
    final = out / "unet_final.safetensors"
    ckpt = out / "unet_ckpt.safetensors"
    if final.exists():
        if _checkpoint_meta(final)["seconds"] >= cfg.unet_minutes * 60:
            return
        final.replace(ckpt)  # a larger budget than the finished run: train on from where it ended
    from transformers import CLIPTokenizer

    torch.manual_seed(cfg.seed)
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    scenes = [scene_from_json(d) for d in json.loads((out / "data" / "scenes.json").read_text())]
    sampling = scene_sampling_probabilities(scenes, cfg.patterned_weight)
    latents = np.load(out / "data" / "latents.npy")
    masks8 = np.load(out / "data" / "masks8.npy")
    vae = load_vae(out)
    scaling, channels = vae.config.scaling_factor, vae.config.latent_channels
    unet = build_unet(channels).to(cfg.device)
    text = build_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id).to(cfg.device)
    noise_sched = build_noise_scheduler()
    noise_sched.alphas_cumprod = noise_sched.alphas_cumprod.to(cfg.device)  # add_noise moves it per call otherwise
    alphas = noise_sched.alphas_cumprod
    if cfg.init_from and not ckpt.exists():
        load_pipeline_weights(Path(cfg.init_from), unet, text)
    elif cfg.unet_from and not ckpt.exists():
        folder = Path(cfg.unet_from)
        load_pipeline_weights(folder, unet, text, transfer_translation(folder, out, scaling), "unet_from")
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    ema_u, ema_t = EMA(unet, cfg.ema_decay), EMA(text, cfg.ema_decay)
    modules = {"unet": unet, "text": text, "ema_unet": ema_u, "ema_text": ema_t}
    meta = {"step": 0, "seconds": 0.0}
    if ckpt.exists():
        meta = load_checkpoint(ckpt, modules, opt)
    store: list = []
    unet.set_attn_processor({
        name: RecordingCrossAttnProcessor(store) if name.endswith("attn2.processor") else proc
        for name, proc in unet.attn_processors.items()
    })
    rng = random.Random(cfg.seed * 7919 + meta["step"])
    nrng = np.random.default_rng(cfg.seed + meta["step"])
    torch.manual_seed(cfg.seed + meta["step"])
    budget = cfg.unet_minutes * 60
    last_ckpt = time.time()
    bar = tqdm(total=int(budget), desc="unet (s)", initial=int(meta["seconds"]))
    while meta["seconds"] < budget:
        t0 = time.time()
        idx = nrng.choice(len(scenes), cfg.unet_batch, replace=False, p=sampling)
        ids, labels = sample_batch(rng, scenes, idx, tokenizer, cfg.caption_dropout, cfg.long_caption_prob)
        ids, labels = ids.to(cfg.device), labels.to(cfg.device)
        lat = torch.from_numpy(latents[idx]).float().to(cfg.device)
        x0 = (lat[:, :channels] + lat[:, channels:] * torch.randn_like(lat[:, :channels])) * scaling
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (len(idx),)).to(cfg.device)
        xt = noise_sched.add_noise(x0, noise, t)
        warm = min(1.0, meta["step"] / 300)
        lr = cfg.lr * warm * (0.5 * (1 + math.cos(math.pi * min(1.0, meta["seconds"] / budget))) * 0.9 + 0.1)
        for g in opt.param_groups:
            g["lr"] = lr
        store.clear()
        emb = text(ids).last_hidden_state
        pred = unet(xt, t, emb).sample
        snr = alphas[t] / (1 - alphas[t])
        weight = min_snr_weights(snr, cfg.snr_gamma)
        diff = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        loss_mse = (diff * weight).mean()
        loss_loc = localisation_loss(store, torch.from_numpy(masks8[idx]).float().to(cfg.device), labels)
        loss = loss_mse + cfg.localisation_weight * loss_loc
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_u.update(meta["step"])
        ema_t.update(meta["step"])
        meta["step"] += 1
        meta["seconds"] += time.time() - t0
        bar.update(int(meta["seconds"]) - bar.n)
        bar.set_postfix(mse=f"{loss_mse.item():.4f}", loc=f"{loss_loc.item():.3f}", step=meta["step"])
        if time.time() - last_ckpt > cfg.checkpoint_minutes * 60:
            save_checkpoint(ckpt, modules, opt, meta)
            last_ckpt = time.time()
    bar.close()
    save_checkpoint(ckpt, modules, opt, meta)
    ckpt.replace(final)


def export_pipeline(out: Path, dest: Path, checkpoint: Path | None = None, ema: bool = True) -> Path:
    """Write a StableDiffusionPipeline folder (fp16 safetensors) from the EMA (or raw) weights."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    vae = load_vae(out)
    unet = build_unet(vae.config.latent_channels)
    text = build_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    tensors = load_file(str(checkpoint or out / "unet_final.safetensors"))
    pre = "ema_" if ema else ""
    unet.load_state_dict({k[len(pre + "unet."):]: v for k, v in tensors.items() if k.startswith(pre + "unet.")})
    text.load_state_dict({k[len(pre + "text."):]: v for k, v in tensors.items() if k.startswith(pre + "text.")})
    sched = DDIMScheduler.from_config(build_noise_scheduler().config, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.to(torch.float16)

    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_anchor_file(tmp)

    replace_dir(dest, write)
    return dest


def train_toy_model(out: str | Path, cfg: ToyTrainConfig | None = None, export_to: str | Path | None = None) -> Path:
    """Run every stage (resuming where a previous run stopped) and export the pipeline folder."""
    cfg = cfg or ToyTrainConfig()
    out = Path(out)
    if cfg.init_from and cfg.unet_from:
        raise ValueError("init_from keeps the pipeline's VAE, unet_from trains a new one: pass one of them")
    if not (math.isfinite(cfg.vae_mark_weight) and cfg.vae_mark_weight >= 0):
        raise ValueError(f"vae_mark_weight must be a finite number >= 0, got {cfg.vae_mark_weight}")
    if cfg.init_from and cfg.vae_mark_weight:
        raise ValueError("vae_mark_weight weighs the loss of a new VAE; init_from keeps the pipeline's (no VAE stage)")
    check_latent_channels(out, cfg)
    if cfg.data_from and not (out / "data" / "scenes.json").exists():
        check_data_from(Path(cfg.data_from), cfg)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    if not (out / "tokenizer" / "vocab.json").exists():
        build_clip_tokenizer(words(), out / "tokenizer")
    t0 = time.time()
    for stage in (stage_init, stage_data, stage_marks, stage_vae, stage_latents, stage_decoder, stage_unet):
        stage(out, cfg)
    dest = Path(export_to) if export_to else out / "pipeline"
    export_pipeline(out, dest)
    print(f"exported {dest} ({time.time() - t0:.0f} s in this run)")
    return dest
