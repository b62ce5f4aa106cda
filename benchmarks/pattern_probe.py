"""Do a toy pipeline's VAE latents carry the pattern (plain, striped, dotted)? A latent probe (issue #3).

A small CNN is trained on the VAE's latents (posterior means, scaled as the UNet sees them) of
one-object renders and tested on held-out ones; then it reads the latents the UNet generates for
"a [striped | dotted] COLOR SHAPE". If the encoded renders already lose the pattern, neither the
UNet nor a decoder fine-tuned alone can draw it.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PATTERNS = ["plain", "striped", "dotted"]


def probe_net(channels: int = 4) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels, 64, 3, padding=1), nn.SiLU(), nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, len(PATTERNS)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="pipeline folder (default: the bundled toy model)")
    ap.add_argument("--scenes", type=int, default=8000, help="renders (about half have one object)")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=4, help="generated images per prompt")
    args = ap.parse_args()

    from eiup.models import load_pipeline
    from eiup.toy.train import encode_latent_stats, render_dataset

    torch.manual_seed(0)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    vae = pipe.vae.float().eval()
    images, _, scenes = render_dataset(args.scenes, 777, 64, processes=1, desc="render")
    one = [i for i, s in enumerate(scenes) if len(s["objects"]) == 1]
    x = torch.from_numpy(encode_latent_stats(vae, images[one])[:, :vae.config.latent_channels].astype(np.float32)) * vae.config.scaling_factor
    y = torch.tensor([PATTERNS.index(scenes[i]["objects"][0]["pattern"]) for i in one])
    n_train = int(len(x) * 0.85)
    net = probe_net(vae.config.latent_channels)
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
    for _ in range(args.epochs):
        for batch in torch.randperm(n_train).split(128):
            loss = F.cross_entropy(net(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        held_out = float((net(x[n_train:]).argmax(1) == y[n_train:]).float().mean())
    majority = float((y[n_train:] == 0).float().mean())

    truth, answers = [], []
    for colour in ("red", "blue", "green", "yellow"):
        for shape in ("circle", "square", "heart"):
            for k, pattern in enumerate(PATTERNS):
                prompt = f"a {pattern + ' ' if pattern != 'plain' else ''}{colour} {shape}"
                latents = pipe(prompt, num_inference_steps=25, num_images_per_prompt=args.seeds,
                               generator=torch.Generator().manual_seed(11), output_type="latent").images
                with torch.no_grad():
                    answers += net(latents.float()).argmax(1).tolist()
                truth += [k] * args.seeds
    truth, answers = np.array(truth), np.array(answers)
    result = {
        "one_object_renders": len(one), "held_out": len(x) - n_train,
        "probe_accuracy_encoded_renders": round(held_out, 3), "always_plain": round(majority, 3),
        "probe_accuracy_generated_latents": round(float((truth == answers).mean()), 3),
        "answers_on_generated_latents": {p: {q: int(((truth == k) & (answers == j)).sum()) for j, q in enumerate(PATTERNS)}
                                         for k, p in enumerate(PATTERNS)},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
