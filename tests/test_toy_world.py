"""The toy world: vocabulary, captions, tokenizer, renderer and the training stages."""

import json
import math
import random

import numpy as np
import pytest
import torch

from eiup.toy.render import render
from eiup.toy.tokenizer import build_clip_tokenizer
from eiup.toy.world import (
    BACKGROUND_RGB, BACKGROUNDS, COLORS, CONCEPTS, IMPLICIT_NOUNS, PATTERNS, SHAPES, caption, caption_words, parse_caption, random_scene,
    rewrite_without, words,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_clip_tokenizer(words(), tmp_path_factory.mktemp("tok"))


def test_every_word_is_one_token_and_padding_is_sd_like(tokenizer):
    for w in words():
        assert len(tokenizer(w, add_special_tokens=False).input_ids) == 1, w
    ids = tokenizer("a tomato at night", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tokenizer.bos_token_id
    assert ids[1:4] == [tokenizer.convert_tokens_to_ids(w + "</w>") for w in ("a", "tomato", "at")]
    assert all(i == tokenizer.eos_token_id for i in ids[6:])  # EOS then EOS padding, as SD 1.x


def test_unknown_words_still_take_positions(tokenizer):
    ids = tokenizer("nudity", add_special_tokens=False).input_ids
    assert len(ids) > 1 and tokenizer.eos_token_id not in ids


def test_captions_parse_back_to_their_scene():
    rng = random.Random(0)
    for _ in range(300):
        scene = random_scene(rng)
        text = caption(scene, rng)
        parsed = parse_caption(text)
        assert [o.attributes() for o in parsed.objects] == [o.attributes() for o in scene.objects], text
        assert parsed.background == scene.background, text


def test_caption_word_labels_point_at_their_object():
    rng = random.Random(1)
    for _ in range(100):
        scene = random_scene(rng)
        for word, label in caption_words(scene, rng):
            if word in COLORS and label < len(scene.objects):
                assert scene.objects[label].color == word
            if word in ("night", "fog"):
                assert label == len(scene.objects)


def test_rewrite_without_sets_the_concepts_attribute_to_another_value_and_keeps_the_rest():
    assert rewrite_without("a photo of a tomato", "red", 0) == "a photo of an orange circle"
    assert rewrite_without("an image of a first aid kit in the fog", "red", 2) == \
        "an image of a green cross on a gray background"  # explicit objects never take "in the fog"
    assert rewrite_without("a tomato and a lime in the fog", "red", 1) == "a yellow circle and a lime in the fog"
    assert rewrite_without("a drawing of a lemon at night", "night", 0) == "a drawing of a lemon"  # white: unnamed
    assert rewrite_without("a red star on a black background", "night", 1) == "a red star on a gray background"
    assert rewrite_without("a strawberry", "heart", 0) == "a dotted red circle"
    assert rewrite_without("a lemon on a white background", "red", 0) == "a lemon on a white background"  # no red
    with pytest.raises(ValueError, match="concept='nudity' is not a toy-world concept"):
        rewrite_without("a tomato", "nudity")
    rng = random.Random(2)
    for concept in ("red", "star", "heart", "night", "striped"):
        for k in range(5):
            text = caption(random_scene(rng), rng)
            before, after = parse_caption(text), parse_caption(rewrite_without(text, concept, k))
            attribute, value = CONCEPTS[concept]
            if attribute == "background":
                assert after.background != value and [o.attributes() for o in after.objects] == \
                    [o.attributes() for o in before.objects], text
                continue
            assert after.background == before.background, text
            for old, new in zip(before.objects, after.objects, strict=True):
                assert getattr(new, attribute) != value, text
                assert {a: v for a, v in new.attributes().items() if a != attribute} == \
                    {a: v for a, v in old.attributes().items() if a != attribute}, text


def test_implicit_nouns_match_the_spec_table():
    assert IMPLICIT_NOUNS["tomato"] == ("red", "circle", "plain")
    assert IMPLICIT_NOUNS["tiger"] == ("orange", "square", "striped")
    assert len(IMPLICIT_NOUNS) == 17
    assert all(c in COLORS and s in SHAPES and p in PATTERNS for c, s, p in IMPLICIT_NOUNS.values())
    assert parse_caption("a photo of a bee in the fog").background == "gray"
    assert parse_caption("an image of a lime and a red star on a black background").objects[1].shape == "star"


def test_render_is_deterministic_and_objects_lie_in_separate_halves():
    rng = random.Random(2)
    seen_two = 0
    for _ in range(40):
        scene = random_scene(rng)
        a, b = render(scene), render(scene)
        assert a.image.shape == (64, 64, 3) and a.image.dtype == np.uint8
        assert np.array_equal(a.image, b.image)
        assert all(m.sum() > 20 for m in a.masks)
        if len(a.masks) == 2:
            seen_two += 1
            assert (a.masks[0] * a.masks[1]).sum() < 1.0  # no overlap
        pixels, counts = np.unique(a.image.reshape(-1, 3), axis=0, return_counts=True)
        assert tuple(pixels[counts.argmax()]) == BACKGROUND_RGB[scene.background]
    assert seen_two > 5


def test_palette_color_reads_the_rendered_colour_of_every_object_without_a_learned_model():
    from eiup.toy.detect import GRID, palette_color, render_detector_scenes

    checked = 0
    for image, cover, scene in zip(*render_detector_scenes(60, seed=0, processes=1)):
        for k, obj in enumerate(scene.objects):
            cells = cover[k] >= 0.5  # the cells the detector is trained to claim for this object
            if cells.sum() >= 3:
                assert palette_color(image, cells, scene.background) == obj.color, (scene, obj)
                checked += 1
    assert checked >= 60
    with pytest.raises(ValueError, match="no pixel of the object's cells differs from the background"):
        palette_color(np.full((64, 64, 3), 255, np.uint8), np.ones((GRID, GRID), bool), "white")


def test_a_detector_without_vae_trains_on_the_renders_as_rendered(tmp_path):
    from safetensors.torch import load_file

    from eiup.toy.detect import ConceptDetector, make_detector_data, render_detector_scenes, train_detector

    images, covers, scenes = make_detector_data(None, 80, seed=5, processes=1)
    rendered, rendered_covers, _ = render_detector_scenes(80, seed=5, processes=1)
    assert np.array_equal(images, rendered) and np.array_equal(covers, rendered_covers)
    path = train_detector(None, tmp_path / "raw.safetensors", n_train=80, minutes=0.02, seed=5, processes=1,
                          cache=tmp_path / "raw.npz")
    weights = load_file(str(path))
    assert all(v.dtype == torch.float16 and torch.isfinite(v).all() for v in weights.values())
    np.testing.assert_array_equal(np.load(tmp_path / "raw.npz")["images"], rendered)  # what it was trained on
    assert len(ConceptDetector.load(path).detect(rendered[:2])) == 2


def test_training_stages_build_a_standard_pipeline_and_resume(tmp_path):
    from diffusers import StableDiffusionPipeline

    from eiup.toy.train import ToyTrainConfig, train_toy_model

    cfg = ToyTrainConfig(n_scenes=96, vae_minutes=0.02, unet_minutes=0.03, vae_batch=8, unet_batch=8,
                         decoder_minutes=0.01, checkpoint_minutes=0.001, threads=1)
    dest = train_toy_model(tmp_path / "run", cfg)
    assert (tmp_path / "run" / "unet_final.safetensors").exists()
    # the exported VAE: the first VAE's encoder (the UNet's latent space) with the fine-tuned decoder
    from safetensors.torch import load_file

    first = load_file(str(tmp_path / "run" / "vae_final.safetensors"))
    tuned = load_file(str(tmp_path / "run" / "vae_decoder_final.safetensors"))
    shipped = load_file(str(dest / "vae" / "diffusion_pytorch_model.safetensors"))
    for k, v in shipped.items():
        assert torch.equal(v, (tuned if k.startswith(("decoder.", "post_quant_conv.")) else first)[k].half())
    assert any(not torch.equal(first[k], tuned[k]) for k in first if k.startswith("decoder."))
    assert not list(dest.rglob("*.bin")) and list(dest.rglob("*.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(dest, torch_dtype=torch.float32, use_safetensors=True)
    assert pipe.unet.dtype == torch.float32
    assert pipe.tokenizer.model_max_length == 77
    image = pipe("a tomato", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    # a rerun resumes: every stage output exists, so nothing is trained again
    mtime = (tmp_path / "run" / "unet_final.safetensors").stat().st_mtime
    train_toy_model(tmp_path / "run", cfg)
    assert (tmp_path / "run" / "unet_final.safetensors").stat().st_mtime == mtime
    # a larger budget trains on from where the finished run ended (the same run, longer)
    import dataclasses

    from eiup.toy.train import _checkpoint_meta

    steps = _checkpoint_meta(tmp_path / "run" / "unet_final.safetensors")["step"]
    train_toy_model(tmp_path / "run", dataclasses.replace(cfg, unet_minutes=cfg.unet_minutes * 2))
    assert _checkpoint_meta(tmp_path / "run" / "unet_final.safetensors")["step"] > steps


def test_long_captions_pad_with_style_words_and_keep_their_labels(tokenizer):
    import random

    from eiup.toy.train import sample_batch
    from eiup.toy.world import FILLER_PHRASES

    scenes = [random_scene(random.Random(i)) for i in range(32)]
    idx = np.arange(32)
    long_ids, long_labels = sample_batch(random.Random(5), scenes, idx, tokenizer, dropout=0.0, long_prob=1.0)
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    for ids, labels in zip(long_ids, long_labels):
        first_filler = int((ids == comma).nonzero()[0])
        labelled = labels.ge(0).nonzero().flatten()
        assert len(labelled) and labelled.max() < first_filler  # fillers come after the caption, unlabelled
        assert all(tokenizer.decode(ids[i : i + 1]).strip() in words() for i in labelled)
    lengths = (long_ids != tokenizer.eos_token_id).sum(1) + 1
    assert (long_ids[:, -1] == tokenizer.eos_token_id).all() and (lengths >= 77).any()  # some run past 77 (truncated)
    attribute_words = set(COLORS + SHAPES + PATTERNS + BACKGROUNDS + ("night", "fog")) | set(" ".join(IMPLICIT_NOUNS).split())
    assert not set(" ".join(FILLER_PHRASES).split()) & attribute_words  # fillers never name a toy attribute


def test_training_on_from_a_pipeline_keeps_its_vae_and_what_its_unet_knows(tmp_path):
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    from eiup.models import default_model_path, load_pipeline
    from eiup.toy.detect import ConceptDetector
    from eiup.toy.train import ToyTrainConfig, train_toy_model

    bundled = default_model_path()
    cfg = ToyTrainConfig(n_scenes=64, vae_minutes=0.02, unet_minutes=0.02, unet_batch=4, threads=1,
                         init_from=str(bundled))
    dest = train_toy_model(tmp_path / "run", cfg)
    theirs = AutoencoderKL.from_pretrained(bundled / "vae", torch_dtype=torch.float32).state_dict()
    ours = load_file(str(dest / "vae" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(ours[k].float(), v) for k, v in theirs.items())  # no VAE stage: its latents keep their meaning
    start = load_file(str(bundled / "unet" / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(dest / "unet" / "diffusion_pytorch_model.safetensors"))
    assert max((after[k].float() - v.float()).abs().max().item() for k, v in start.items()) < 0.05
    pipe = load_pipeline(dest)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a tomato"] * 2, num_inference_steps=25, generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images
    assert all(d.has("color", "red") for d in ConceptDetector.load().detect(images))  # a from-scratch run this short draws noise


def test_training_on_from_a_pipeline_with_another_vocabulary_stops_before_any_work(tmp_path):
    import shutil

    from eiup.models import default_model_path
    from eiup.toy.tokenizer import build_clip_tokenizer
    from eiup.toy.train import ToyTrainConfig, train_toy_model

    other = tmp_path / "other"
    shutil.copytree(default_model_path(), other)
    shutil.rmtree(other / "tokenizer")
    build_clip_tokenizer(["a", "cat", "and", "dog"], other / "tokenizer")
    with pytest.raises(ValueError, match="is not the toy world's tokenizer; init_from takes a toy pipeline"):
        train_toy_model(tmp_path / "run", ToyTrainConfig(n_scenes=64, init_from=str(other), threads=1))
    assert not (tmp_path / "run" / "data").exists() and not (tmp_path / "run" / "vae_final.safetensors").exists()


def test_training_on_from_a_pipeline_refuses_a_work_folder_with_another_vae(tmp_path):
    from eiup.models import default_model_path
    from eiup.toy.train import ToyTrainConfig, train_toy_model

    cfg = ToyTrainConfig(n_scenes=64, vae_minutes=0.01, unet_minutes=0.01, vae_batch=8, unet_batch=4, threads=1)
    train_toy_model(tmp_path / "run", cfg)  # a from-scratch run: its own VAE
    with pytest.raises(ValueError, match="already holds a run with another VAE"):
        train_toy_model(tmp_path / "run", ToyTrainConfig(**{**cfg.__dict__, "init_from": str(default_model_path())}))


def test_a_run_reuses_another_runs_scenes_and_its_latents_only_where_its_vae_is_the_same(tmp_path):
    import numpy as np

    from eiup.toy.train import ToyTrainConfig, train_toy_model

    tiny = dict(n_scenes=64, vae_minutes=0.01, unet_minutes=0.01, vae_batch=8, unet_batch=4, threads=1)
    first = tmp_path / "first"
    train_toy_model(first, ToyTrainConfig(**tiny))
    second = tmp_path / "second"  # on from the first's pipeline: its VAE went through fp16, so other latents
    train_toy_model(second, ToyTrainConfig(**tiny, seed=5, init_from=str(first / "pipeline"), data_from=str(first)))
    for name in ("images.npy", "masks8.npy", "scenes.json"):
        assert (second / "data" / name).read_bytes() == (first / "data" / name).read_bytes()
    assert not (second / "data" / "latents.npy").samefile(first / "data" / "latents.npy")
    third = tmp_path / "third"  # on from the second's pipeline: the same VAE, so the same latents
    train_toy_model(third, ToyTrainConfig(**tiny, init_from=str(second / "pipeline"), data_from=str(second)))
    assert (third / "data" / "latents.npy").samefile(second / "data" / "latents.npy")
    assert np.load(third / "data" / "latents.npy").shape[0] == 64
    with pytest.raises(ValueError, match="holds 64 scenes, not n_scenes=128; pass n_scenes=64"):
        train_toy_model(tmp_path / "fourth", ToyTrainConfig(**{**tiny, "n_scenes": 128}, data_from=str(first)))
    assert not (tmp_path / "fourth" / "data").exists()


def test_a_judge_with_a_threshold_flags_by_the_concepts_probability():
    from eiup.calibrate import toy_judge
    from eiup.toy.detect import ConceptDetector
    from eiup.toy.world import Obj, Scene

    images = [render(Scene((Obj(c, "circle"),), "white", layout_seed=3)).image for c in ("red", "orange", "blue")]
    detector = ConceptDetector.load()
    found = detector.detect(images)
    assert [d.has("color", "red") for d in found] == toy_judge("red", detector)(images)
    scores = [d.score("color", "red") for d in found]
    assert scores[0] > 0.5 > scores[2]  # red reads red; blue does not
    for t in (0.0, 0.3, 0.99, 1.01):
        assert toy_judge("red", detector, threshold=t)(images) == [s >= t for s in scores]
    assert toy_judge("red", detector, threshold=0.0)(images) == [True] * 3
    assert found[0].score("background", "white") == pytest.approx(float(found[0].background_scores.max()))


def test_a_run_with_more_latent_channels_builds_a_pipeline_that_erases_and_refuses_to_resume_with_other_channels(tmp_path):
    from eiup import EIUPPipeline
    from eiup.toy.train import ToyTrainConfig, train_toy_model

    cfg = ToyTrainConfig(n_scenes=64, vae_minutes=0.01, unet_minutes=0.01, vae_batch=8, unet_batch=4, threads=1,
                         latent_channels=8)
    dest = train_toy_model(tmp_path / "run", cfg)
    pipe = EIUPPipeline.from_pretrained(dest, torch_dtype=torch.float32)
    assert pipe.vae.config.latent_channels == pipe.unet.config.in_channels == pipe.unet.config.out_channels == 8
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a tomato", erase="red", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="latent")
    assert out.images.shape == (1, 8, 8, 8) and torch.isfinite(out.images).all()
    with pytest.raises(ValueError, match="holds a VAE with 8 latent channels, not 4; resume it with latent_channels=8"):
        train_toy_model(tmp_path / "run", ToyTrainConfig(**{**cfg.__dict__, "latent_channels": 4}))
    with pytest.raises(ValueError, match="latent_channels must be in 1..64"):
        train_toy_model(tmp_path / "other", ToyTrainConfig(latent_channels=0))
    assert not (tmp_path / "other").exists()


def test_a_run_with_a_new_vae_starts_its_unet_from_a_pipeline_carried_into_the_new_latent_space(tmp_path, capsys,
                                                                                             bundled_latent_widths):
    import shutil

    from safetensors.torch import load_file

    from eiup.models import default_model_path
    from eiup.toy.train import ToyTrainConfig, train_toy_model

    bundled = default_model_path()
    own, new = bundled_latent_widths  # into a latent space of another width than the bundled model's
    cfg = ToyTrainConfig(n_scenes=64, vae_minutes=0.01, unet_minutes=0.01, vae_batch=8, unet_batch=4, threads=1,
                         latent_channels=new, unet_from=str(bundled))
    dest = train_toy_model(tmp_path / "run", cfg)
    assert f"unet_from {bundled}: {own} -> {new} latent channels, the map explains" in capsys.readouterr().out
    start = load_file(str(bundled / "unet" / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(dest / "unet" / "diffusion_pytorch_model.safetensors"))
    assert after["conv_in.weight"].shape[1] == after["conv_out.weight"].shape[0] == new
    body = [k for k in start if not k.startswith(("conv_in.", "conv_out."))]
    assert max((after[k].float() - start[k].float()).abs().max().item() for k in body) < 0.05
    text_start = load_file(str(bundled / "text_encoder" / "model.safetensors"))
    text_after = load_file(str(dest / "text_encoder" / "model.safetensors"))
    assert max((text_after[k].float() - v.float()).abs().max().item() for k, v in text_start.items()) < 0.05

    other = tmp_path / "other"
    shutil.copytree(bundled, other)
    shutil.rmtree(other / "tokenizer")
    build_clip_tokenizer(["a", "cat", "and", "dog"], other / "tokenizer")
    with pytest.raises(ValueError, match="is not the toy world's tokenizer; unet_from takes a toy pipeline"):
        train_toy_model(tmp_path / "run2", ToyTrainConfig(n_scenes=64, unet_from=str(other), threads=1))
    assert not (tmp_path / "run2" / "data").exists()
    with pytest.raises(ValueError, match="init_from keeps the pipeline's VAE, unet_from trains a new one"):
        train_toy_model(tmp_path / "run3", ToyTrainConfig(init_from=str(bundled), unet_from=str(bundled)))
    assert not (tmp_path / "run3").exists()


def test_shading_augmentation_blotches_the_objects_not_the_background():
    from eiup.toy.detect import augment, render_detector_scenes

    images, covers, scenes = render_detector_scenes(16, seed=9, processes=1)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    plain_out, plain_flip = augment(x, torch.Generator().manual_seed(0), shading=0.0)
    shaded, flip = augment(x, torch.Generator().manual_seed(0), shading=0.25)
    again, _ = augment(x, torch.Generator().manual_seed(0), shading=0.25)
    assert torch.equal(shaded, again)  # seeded
    unflipped = torch.where(flip[:, None, None, None], shaded.flip(-1), shaded)
    objects = torch.from_numpy(covers.max(1) >= 0.99).repeat_interleave(4, 1).repeat_interleave(4, 2)
    background = torch.from_numpy(covers.sum(1) == 0).repeat_interleave(4, 1).repeat_interleave(4, 2)
    change = (unflipped - x).abs().mean(1)  # pixel noise and blur included
    assert change[objects].mean() > 2 * change[background].mean()
    plain_unflipped = torch.where(plain_flip[:, None, None, None], plain_out.flip(-1), plain_out)
    assert change[objects].mean() > 2 * (plain_unflipped - x).abs().mean(1)[objects].mean()


def test_brightness_augmentation_scales_each_images_objects_by_one_factor():
    from eiup.toy.detect import augment, render_detector_scenes

    images, covers, _ = render_detector_scenes(24, seed=11, processes=1)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    objects = torch.from_numpy(covers.max(1) >= 0.99).repeat_interleave(4, 1).repeat_interleave(4, 2)

    def object_gain(brightness):
        out, flip = augment(x, torch.Generator().manual_seed(0), brightness=brightness)
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
        ratio = ((out + 1) / (x + 1).clamp_min(0.05)).mean(1)
        return torch.stack([ratio[i][objects[i]].median() for i in range(len(x))])

    plain, varied = object_gain(0.0), object_gain(0.2)
    assert plain.std() < 0.03 and varied.std() > 0.06
    assert 0.8 - 0.03 <= varied.min() and varied.max() <= 1.2 + 0.03
    from eiup.toy.detect import train_detector

    with pytest.raises(ValueError, match=r"brightness must be in \[0, 1\)"):
        train_detector(None, "unused.safetensors", brightness=float("nan"))


def test_scale_objects_scales_what_differs_from_the_border_and_keeps_the_background():
    from eiup.toy.detect import render_detector_scenes, scale_objects

    images, covers, _ = render_detector_scenes(12, seed=13, processes=1)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    darker = scale_objects(x, 0.9)
    objects = torch.from_numpy(covers.max(1) >= 0.99).repeat_interleave(4, 1).repeat_interleave(4, 2)
    background = torch.from_numpy(covers.sum(1) == 0).repeat_interleave(4, 1).repeat_interleave(4, 2)
    assert torch.equal(darker.permute(0, 2, 3, 1)[background], x.permute(0, 2, 3, 1)[background])
    ratio = ((darker + 1) / (x + 1).clamp_min(1e-3)).permute(0, 2, 3, 1)[objects]
    lit = (x + 1).permute(0, 2, 3, 1)[objects] > 0.5  # channels far from black
    assert ratio[lit].median().item() == pytest.approx(0.9, abs=0.02)


def test_patterned_weight_draws_scenes_with_a_striped_or_dotted_object_that_much_more_often():
    from eiup.toy.train import scene_sampling_probabilities
    from eiup.toy.world import Obj, Scene

    plain = Scene((Obj("red", "circle", "plain"),), "white", 0)
    dotted_second = Scene((Obj("red", "circle", "plain"), Obj("blue", "star", "dotted")), "white", 1)
    ladybug = Scene((Obj("red", "circle", "dotted", noun="ladybug"),), "gray", 2)  # an implicit noun's pattern counts
    assert scene_sampling_probabilities([plain, dotted_second, ladybug], 1.0) is None  # the default sampler
    p = scene_sampling_probabilities([plain, dotted_second, ladybug], 3.0)
    assert p == pytest.approx([1 / 7, 3 / 7, 3 / 7])
    drawn = np.random.default_rng(0).choice(3, size=(4000, 1), p=p)
    assert abs((drawn == 0).mean() - 1 / 7) < 0.03


def test_min_snr_weights_cap_the_low_noise_timesteps_and_inf_gives_the_plain_noise_loss():
    from eiup.toy.train import build_noise_scheduler, min_snr_weights

    alphas = build_noise_scheduler().alphas_cumprod
    t = torch.tensor([0, 100, 400, 700, 999])
    snr = alphas[t] / (1 - alphas[t])
    w = min_snr_weights(snr, 5.0)
    assert torch.all(w[snr <= 5] == 1) and torch.all(w[snr > 5] < 1)  # noisy steps in full, clean ones capped
    assert w[0].item() == pytest.approx(5 / snr[0].item())  # min(SNR, 5) / SNR
    assert torch.all(w[:-1] <= w[1:])  # more noise never weighs less
    assert torch.equal(min_snr_weights(snr, math.inf), torch.ones(5))


def test_render_reports_where_the_dots_and_stripes_are():
    from eiup.toy.world import Obj, Scene

    for pattern, share in (("plain", 0.0), ("dotted", math.pi * 0.27**2), ("striped", 0.5)):
        r = render(Scene((Obj("green", "square", pattern),), "white", 3))
        inside = r.masks[0] > 0.99
        assert r.marks.shape == (64, 64) and r.marks.min() >= 0 and r.marks.max() <= 1
        assert r.marks[r.masks[0] == 0].max() == 0  # marks only on the object
        assert r.marks[inside].mean() == pytest.approx(share, abs=0.08), pattern
        if pattern != "plain":  # the marks are the object's dark pixels
            dark = r.image[inside].astype(int).sum(-1) < 0.7 * r.image[inside].astype(int).sum(-1).max()
            assert (r.marks[inside] > 0.5)[dark].mean() > 0.9


def test_marks_weighted_mse_counts_only_the_marks_and_their_rims():
    from eiup.toy.train import marks_weighted_mse

    x = torch.zeros(2, 3, 8, 8)
    marks = torch.zeros(2, 1, 8, 8)
    marks[0, 0, 4, 4] = 1.0  # one marked pixel in the first image, none in the second
    rec = x.clone()
    rec[1] += 1.0  # the unmarked image wrong everywhere: not counted
    rec[0, :, 0, 0] = 1.0  # far from the mark: not counted
    assert marks_weighted_mse(rec, x, marks).item() == 0
    rec[0, :, 5, 5] = 0.5  # on the mark's rim (3x3 around it): counted
    assert marks_weighted_mse(rec, x, marks).item() == pytest.approx(3 * 0.25 / 9)
    assert marks_weighted_mse(x, x, torch.zeros_like(marks)).item() == 0  # no marks anywhere: nothing added


def test_bare_weighted_mse_counts_the_objects_pixels_away_from_their_marks():
    from eiup.toy.train import bare_object_pixels, bare_weighted_mse

    x = -torch.ones(1, 3, 12, 12)  # a black background
    x[0, 0, 2:10, 2:10] = 1.0  # a red object
    marks = torch.zeros(1, 1, 12, 12)
    marks[0, 0, 3, 3] = 1.0  # one dot in its corner
    bare = bare_object_pixels(x, marks)[0, 0]
    assert bare.sum().item() == 64 - 9  # the object less the dot and its rim
    assert bare[:2].sum().item() == 0 and bare[3, 3].item() == 0 and bare[6, 6].item() == 1
    rec = x.clone()
    rec[0, :, 0, 0] = 0.0  # background: not counted
    rec[0, :, 4, 4] = 0.0  # the dot's rim: marks_weighted_mse's, not counted here
    assert bare_weighted_mse(rec, x, marks).item() == 0
    rec[0, 0, 7, 7] = 0.0  # a blotch drawn on the bare object: counted
    assert bare_weighted_mse(rec, x, marks).item() == pytest.approx(1.0 / 55)


def test_mark_weighted_vae_stage_renders_the_marks_of_its_scenes_and_refuses_a_kept_vae(tmp_path, monkeypatch):
    import eiup.toy.train as train
    from eiup.models import default_model_path
    from eiup.toy.train import ToyTrainConfig, scene_from_json, train_toy_model

    seen = []

    def recording(rec, x, marks):
        seen.append(marks)
        return real(rec, x, marks)

    real = train.marks_weighted_mse
    monkeypatch.setattr(train, "marks_weighted_mse", recording)
    cfg = ToyTrainConfig(n_scenes=64, vae_minutes=0.01, unet_minutes=0.01, vae_batch=8, unet_batch=4, threads=1,
                         vae_mark_weight=4.0)
    train_toy_model(tmp_path / "run", cfg)
    assert seen and all(m.shape == (8, 1, 32, 32) and 0 <= m.min() and m.max() <= 1 for m in seen)  # cropped as x
    marks = np.load(tmp_path / "run" / "data" / "marks.npy")
    scenes = json.loads((tmp_path / "run" / "data" / "scenes.json").read_text())
    assert marks.shape == (64, 64, 64) and marks.dtype == np.uint8
    for k in (0, 7, 63):
        expected = (render(scene_from_json(scenes[k])).marks * 255).round()
        assert np.array_equal(marks[k], expected.astype(np.uint8))
        assert (marks[k].max() > 0) == any(o["pattern"] != "plain" for o in scenes[k]["objects"])
    (tmp_path / "run" / "data" / "marks.npy").unlink()  # data rendered by a run without a mark weight
    (tmp_path / "run" / "vae_final.safetensors").unlink()
    train.stage_marks(tmp_path / "run", cfg)  # renders them again from the scenes
    assert np.array_equal(np.load(tmp_path / "run" / "data" / "marks.npy"), marks)
    with pytest.raises(ValueError, match="init_from keeps the pipeline's"):
        train_toy_model(tmp_path / "other", ToyTrainConfig(n_scenes=64, init_from=str(default_model_path()),
                                                           vae_mark_weight=1.0))
    with pytest.raises(ValueError, match="vae_mark_weight must be a finite number >= 0, got nan"):
        train_toy_model(tmp_path / "other", ToyTrainConfig(n_scenes=64, vae_mark_weight=float("nan")))
    assert not (tmp_path / "other").exists()


def test_finetune_vae_moves_the_encoder_and_a_rerun_leaves_the_finished_folder_alone(tmp_path):
    import shutil

    from diffusers import AutoencoderKL

    from eiup.models import default_model_path
    from eiup.toy.train import finetune_pipeline_vae

    model = tmp_path / "model"
    shutil.copytree(default_model_path() / "vae", model / "vae")
    before = AutoencoderKL.from_pretrained(model / "vae", torch_dtype=torch.float32)
    result = finetune_pipeline_vae(model, minutes=0.005, scenes=80, seed=3, work=tmp_path / "work", mark_weight=4.0)
    after = AutoencoderKL.from_pretrained(model / "vae", torch_dtype=torch.float32)
    assert result.steps >= 1 and math.isfinite(result.psnr_after)
    moved = lambda part: any(not torch.equal(a, b) for a, b in  # noqa: E731
                             zip(getattr(before, part).parameters(), getattr(after, part).parameters()))
    assert moved("encoder") and moved("decoder")
    assert after.config.scaling_factor != before.config.scaling_factor  # re-estimated on the new latents
    stamp = (model / "vae" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    again = finetune_pipeline_vae(model, minutes=0.005, scenes=80, seed=3, work=tmp_path / "work", mark_weight=4.0)
    assert again == result and (model / "vae" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    other = tmp_path / "other"
    with torch.no_grad():
        before.encoder.conv_in.bias += 0.01  # another VAE than the one the work folder started from
    before.save_pretrained(other / "vae", safe_serialization=True)
    with pytest.raises(ValueError, match="holds a fine-tune of another VAE"):
        finetune_pipeline_vae(other, minutes=0.005, scenes=80, seed=3, work=tmp_path / "work", mark_weight=4.0)
    with pytest.raises(ValueError, match="mark_weight must be a finite number >= 0, got nan"):
        from eiup.toy.train import finetune_vae

        finetune_vae(before, np.zeros((80, 64, 64, 3), np.uint8), np.zeros((80, 64, 64), np.uint8), 0.01,
                     mark_weight=float("nan"))
    with pytest.raises(ValueError, match="bare_weight must be a finite number >= 0, got -1"):
        finetune_vae(before, np.zeros((80, 64, 64, 3), np.uint8), np.zeros((80, 64, 64), np.uint8), 0.01,
                     bare_weight=-1.0)
    bare = finetune_pipeline_vae(model, minutes=0.005, scenes=80, seed=3, work=tmp_path / "work", mark_weight=4.0,
                                 bare_weight=4.0)  # another fine-tune (its own checkpoint) of the VAE now there
    assert bare != result and sorted(p.name for p in (tmp_path / "work").glob("*bare4*")) == [
        "vae-80-3-marks4-bare4.json", "vae-80-3-marks4-bare4.safetensors"]
    before = AutoencoderKL.from_pretrained(model / "vae", torch_dtype=torch.float32)
    finetune_pipeline_vae(model, minutes=0.005, scenes=80, seed=3, work=tmp_path / "work", mark_weight=4.0,
                          bare_weight=4.0, decoder_only=True)
    after = AutoencoderKL.from_pretrained(model / "vae", torch_dtype=torch.float32)
    assert moved("decoder") and not moved("encoder") and not moved("quant_conv")  # the latents keep their meaning
    assert after.config.scaling_factor == before.config.scaling_factor
    assert (tmp_path / "work" / "decoder-80-3-marks4-bare4.safetensors").exists()
