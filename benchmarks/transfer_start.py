"""How well does a UNet carried into a new VAE's latent space denoise there before any training step?

Issue #3: ``eiup toy train --unet-from P`` starts a run whose VAE is new (e.g. 8 latent channels) from
pipeline P's UNet and text encoder, translating the UNet's first and last convolutions by a least-squares
map between both VAEs' latents (eiup.toy.transfer). This compares the training loss (min-SNR weighted
noise MSE, as ``stage_unet`` computes it) on the run's own latents and captions, same noise and timesteps,
for: a fresh UNet, P's UNet with fresh first/last convolutions, and P's UNet translated.

    python benchmarks/transfer_start.py --run runs/lc8 --unet-from src/eiup/toy/weights/pipeline
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="work folder of `eiup toy train` (data, VAE, latents)")
    ap.add_argument("--unet-from", type=Path, required=True, help="the pipeline whose UNet is carried over")
    ap.add_argument("--samples", type=int, default=512)
    args = ap.parse_args()

    from safetensors.torch import load_file
    from transformers import CLIPTokenizer

    from eiup.toy.train import (build_noise_scheduler, build_text_encoder, build_unet, load_pipeline_weights, load_vae,
                                sample_batch, scene_from_json, transfer_translation)

    torch.manual_seed(0)
    vae = load_vae(args.run)
    scaling, channels = vae.config.scaling_factor, vae.config.latent_channels
    tokenizer = CLIPTokenizer.from_pretrained(args.run / "tokenizer")
    scenes = [scene_from_json(d) for d in json.loads((args.run / "data" / "scenes.json").read_text())]
    latents = np.load(args.run / "data" / "latents.npy", mmap_mode="r")
    idx = np.random.default_rng(5).choice(np.arange(5000, len(scenes)), args.samples, replace=False)  # not the map's renders
    ids, _ = sample_batch(random.Random(5), scenes, idx, tokenizer, dropout=0.0)
    x0 = torch.from_numpy(latents[idx][:, :channels].astype(np.float32)) * scaling
    noise, t = torch.randn_like(x0), torch.randint(0, 1000, (len(idx),))
    sched = build_noise_scheduler()
    xt, alphas = sched.add_noise(x0, noise, t), sched.alphas_cumprod
    snr = alphas[t] / (1 - alphas[t])
    weight = torch.clamp(snr, max=5.0) / snr

    def loss_of(unet, text) -> tuple[float, float]:
        with torch.no_grad():
            preds = [unet(xt[i:i + 64], t[i:i + 64], text(ids[i:i + 64]).last_hidden_state).sample
                     for i in range(0, len(idx), 64)]
        diff = ((torch.cat(preds) - noise) ** 2).mean(dim=(1, 2, 3))
        return float((diff * weight).mean()), float(diff.mean())

    def fresh():
        return build_unet(channels).eval(), build_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id).eval()

    rows = {}
    unet, text = fresh()
    rows["fresh UNet and text encoder"] = loss_of(unet, text)
    unet, text = fresh()
    body = load_file(str(args.unet_from / "unet" / "diffusion_pytorch_model.safetensors"))
    unet.load_state_dict({k: v.float() for k, v in body.items() if not k.startswith(("conv_in.", "conv_out."))}, strict=False)
    text.load_state_dict({k: v.float() for k, v in load_file(str(args.unet_from / "text_encoder" / "model.safetensors")).items()})
    rows["their body, fresh conv_in/conv_out"] = loss_of(unet, text)
    unet, text = fresh()
    load_pipeline_weights(args.unet_from, unet, text, transfer_translation(args.unet_from, args.run, scaling), "unet_from")
    rows["their UNet translated (eiup.toy.transfer)"] = loss_of(unet, text)
    print("| start | weighted loss | plain noise MSE |\n|---|---|---|")
    for name, (w, m) in rows.items():
        print(f"| {name} | {w:.4f} | {m:.4f} |")


if __name__ == "__main__":
    main()
