"""Closed-loop erasure (eiup.guard): per-image strengths, the ladder the guard climbs, and its checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eiup import EraseConfigError
from eiup.guard import Walk, check_ladder

KW = dict(num_inference_steps=3, output_type="np", concept_context="separate")
ANCHORS = '{"red": {"anchors": ["blue", "green"], "strength": 1.0}}'
PROMPTS = ["a red tree", "a red house", "a red car"]


def gens(n: int = 3) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(10 + i) for i in range(n)]


class Scripted:
    """A guard that flags the images whose index (in the whole call) is listed, per attempt, and records calls."""

    def __init__(self, flags_per_call: list[list[bool]]):
        self.flags, self.sizes = list(flags_per_call), []

    def __call__(self, images):
        self.sizes.append(len(images))
        return self.flags.pop(0)


def test_ladder_must_be_strictly_increasing_positive_strengths():
    assert check_ladder([0.5, 1, 2], 8.0) == (0.5, 1.0, 2.0)
    for bad in ([], [1, 0.5], [0.5, 0.5], [0, 1], [1, float("nan")], [1, 9], "fast"):
        with pytest.raises(ValueError, match="guard_ladder"):
            check_ladder(bad, 8.0)


def test_a_walk_goes_up_while_seen_down_while_harmed_and_stops_where_milder_shows_the_concept():
    rungs = [0.5, 1.0, 1.25, 2.0]
    up = Walk(rungs, 1.25)
    assert up.step(seen=True, harmed=False) and up.strength == 2.0
    assert not up.step(seen=True, harmed=False)  # the top: over
    down = Walk(rungs, 1.25, onward=False)
    assert down.step(seen=False, harmed=True) and down.strength == 1.0
    assert down.step(seen=False, harmed=True) and down.strength == 0.5
    assert not down.step(seen=False, harmed=True)  # the bottom
    back = Walk(rungs, 1.25, onward=False)
    assert back.step(seen=False, harmed=True) and not back.step(seen=True, harmed=False)  # milder leaks: over
    assert not Walk(rungs, 1.25).step(seen=False, harmed=False)  # clean and unharmed at once
    climbing = Walk(rungs, 0.5, onward=False)
    assert climbing.step(True, False) and not climbing.step(False, True)  # going up: the first clean draw ends it
    assert not Walk(rungs, 0.5).milder and down.milder


def test_an_onward_walk_looks_past_a_harmed_clean_draw_on_both_sides():
    rungs = [0.5, 1.0, 1.25, 1.5, 2.0]
    climbing = Walk(rungs, 0.5)
    assert climbing.step(seen=True, harmed=False) and climbing.strength == 1.0
    assert climbing.step(seen=False, harmed=True) and climbing.strength == 1.25  # clean but harmed: on up
    assert not climbing.step(seen=False, harmed=False)  # clean and unharmed: over
    leaks_again = Walk(rungs, 0.5)
    assert leaks_again.step(True, False) and leaks_again.step(False, True)
    assert not leaks_again.step(seen=True, harmed=False)  # the concept again above a clean draw: over
    turned = Walk(rungs, 1.25)
    assert turned.step(seen=False, harmed=True) and turned.strength == 1.0 and turned.milder
    assert turned.step(seen=True, harmed=False) and turned.strength == 1.5 and not turned.milder  # milder leaks: up
    assert turned.step(seen=False, harmed=True) and turned.strength == 2.0
    assert not turned.step(seen=False, harmed=True)  # the top
    floor = Walk(rungs, 1.0)
    assert floor.step(False, True) and floor.strength == 0.5
    assert floor.step(False, True) and floor.strength == 1.25  # the bottom: up from above the first strength
    top_start = Walk([0.5, 1.0], 1.0)
    assert top_start.step(False, True) and top_start.strength == 0.5
    assert not top_start.step(False, True)  # the bottom, and nothing above the first strength


def test_per_image_strengths_equal_separate_fixed_calls(sd1, model_folder):
    (model_folder / "eiup_anchors.json").write_text(ANCHORS)
    kw = dict(erase="red", anchor_gate=False, prompt_gate=False, **KW)
    out = sd1(PROMPTS[:2], anchor_strength=[0.5, 2.0], generator=gens(2), **kw)
    np.testing.assert_array_equal(out.anchor_strengths["red"], [0.5, 2.0])
    for k, s in enumerate((0.5, 2.0)):
        alone = sd1(PROMPTS[k], anchor_strength=s, generator=gens(2)[k], **kw).images[0]
        assert np.allclose(out.images[k], alone, atol=1e-5)
    assert not np.allclose(out.images[0], sd1(PROMPTS[0], anchor_strength=2.0, generator=gens(1), **kw).images[0], atol=1e-4)
    with pytest.raises(EraseConfigError, match="2 values but the call makes 3 images"):
        sd1(PROMPTS, anchor_strength=[0.5, 2.0], **kw)
    with pytest.raises(EraseConfigError, match=r"anchor_strength\[1\]"):
        sd1(PROMPTS[:2], anchor_strength=[0.5, -1], **kw)


def test_guard_starts_at_the_preset_and_climbs_flagged_images_from_the_same_noise(sd1, model_folder):
    (model_folder / "eiup_anchors.json").write_text(ANCHORS)  # the preset: strength 1
    ladder = [0.5, 1.0, 2.0]
    guard = Scripted([[True, False, True], [False, True]])  # image 0 clears at 2.0, image 2 is still seen at the top
    out = sd1(PROMPTS, erase="red", guard=guard, guard_ladder=ladder, guard_negative_prompt=False, generator=gens(), **KW)
    assert guard.sizes == [3, 2]
    assert out.guard_attempts.tolist() == [2, 1, 2] and out.guard_flagged == [False, False, True]
    np.testing.assert_array_equal(out.anchor_strengths["red"], [2.0, 1.0, 2.0])
    fixed = sd1(PROMPTS, erase="red", anchor_strength=[2.0, 1.0, 2.0], generator=gens(), **KW)
    np.testing.assert_allclose(out.images, fixed.images, atol=1e-5)  # each image as drawn at its strength
    preset = sd1(PROMPTS, erase="red", guard=False, generator=gens(), **KW)
    np.testing.assert_array_equal(preset.anchor_strengths["red"], [1.0] * 3)
    np.testing.assert_allclose(out.images[1], preset.images[1], atol=1e-5)  # passed at once: the preset's image


def test_an_image_still_flagged_at_the_top_is_drawn_again_with_the_concept_as_negative_prompt(sd1, model_folder):
    from eiup.guard import NEGATIVE_PROMPT_GUIDANCE

    (model_folder / "eiup_anchors.json").write_text(ANCHORS)  # the preset: strength 1
    run = dict(erase="red", guard_ladder=[0.5, 1.0, 2.0], negative_prompt=["blurry"] * 3, guidance_scale=6.0, **KW)
    # image 2: seen at the top, seen with the negative prompt at the call's guidance, clean at the next multiple
    guard = Scripted([[True, False, True], [False, True], [True], [False]])
    out = sd1(PROMPTS, guard=guard, generator=gens(), **run)
    assert guard.sizes == [3, 2, 1, 1] and out.guard_attempts.tolist() == [2, 1, 4]
    assert out.guard_flagged == [False, False, False] and out.guard_negative_prompt == [False, False, True]
    assert out.anchor_strengths["red"][1] == 1.0 and np.isnan(out.anchor_strengths["red"][2])
    plain = sd1(PROMPTS, negative_prompt=["blurry, red"] * 3, guidance_scale=6.0 * NEGATIVE_PROMPT_GUIDANCE[1],
                generator=gens(), **KW)  # the user's negative prompt kept, the concept added
    np.testing.assert_allclose(out.images[2], plain.images[2], atol=1e-5)
    preset = sd1(PROMPTS, erase="red", guard=False, negative_prompt=["blurry"] * 3, generator=gens(), **KW)
    assert np.abs(out.images[2] - preset.images[2]).max() > 1e-3
    still = Scripted([[True, False, True], [False, True]] + [[True]] * (len(NEGATIVE_PROMPT_GUIDANCE) + 1))
    out = sd1(PROMPTS, guard=still, generator=gens(), **run)  # seen at every multiple and with both: flagged, top kept
    assert out.guard_flagged == [False, False, True] and out.guard_negative_prompt == [False] * 3
    assert out.anchor_strengths["red"][2] == 2.0 and out.guard_attempts[2] == 3 + len(NEGATIVE_PROMPT_GUIDANCE)
    fixed = sd1(PROMPTS, erase="red", anchor_strength=[2.0, 1.0, 2.0], negative_prompt=["blurry"] * 3,
                guidance_scale=6.0, generator=gens(), **KW)
    np.testing.assert_allclose(out.images[2], fixed.images[2], atol=1e-5)
    both = Scripted([[True, False, True], [False, True]] + [[True]] * len(NEGATIVE_PROMPT_GUIDANCE) + [[False]])
    out = sd1(PROMPTS, guard=both, generator=gens(), **run)  # clean only with the negative prompt and the erasure
    assert out.guard_flagged == [False] * 3 and out.guard_negative_prompt == [False, False, True]
    assert out.anchor_strengths["red"][2] == 1.0 and out.guard_attempts[2] == 3 + len(NEGATIVE_PROMPT_GUIDANCE)
    combined = sd1(PROMPTS, erase="red", anchor_strength=[1.0] * 3, negative_prompt=["blurry, red"] * 3,
                   guidance_scale=6.0, generator=gens(), **KW)  # at its first strength, the preset's
    np.testing.assert_allclose(out.images[2], combined.images[2], atol=1e-5)
    assert np.abs(out.images[2] - fixed.images[2]).max() > 1e-3
    no_cfg = Scripted([[True, False, True], [False, True]])  # guidance 1: a negative prompt does nothing, none drawn
    assert sd1(PROMPTS, guard=no_cfg, generator=gens(), **{**run, "guidance_scale": 1.0}).guard_flagged[2]


def test_guard_leaves_images_the_gate_did_not_project_and_reports_them(sd1, model_folder):
    (model_folder / "eiup_anchors.json").write_text(ANCHORS)
    prompts = ["a red tree", "a tree house"]  # the second is nearer an anchor than the concept: not projected
    guard = Scripted([[True, True], [False]])
    out = sd1(prompts, erase="red", guard=guard, generator=gens(2), **KW)
    assert guard.sizes == [2, 1] and out.guard_attempts.tolist() == [2, 1]
    assert out.guard_flagged == [False, True]  # still flagged: the product withholds it
    assert out.anchor_strengths["red"][0] == 1.25 and np.isnan(out.anchor_strengths["red"][1])  # one rung above 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(guard="toy"), "must be a callable"),
    (dict(guard=lambda im: [False] * len(im), anchor_strength=1.0), "drop anchor_strength"),
    (dict(guard=lambda im: [False] * len(im), guard_ladder=[2, 1]), "guard_ladder"),
    (dict(guard=lambda im: [False] * len(im), anchors=[]), "give anchors"),
    (dict(guard=lambda im: [False] * len(im), negative_prompt_embeds=torch.zeros(3, 77, 32)), "negative_prompt=..."),
])
def test_bad_guard_arguments_are_refused_before_model_work(sd1, model_folder, kwargs, match):
    (model_folder / "eiup_anchors.json").write_text(ANCHORS)
    with pytest.raises(EraseConfigError, match=match):
        sd1(PROMPTS, erase="red", **KW, **kwargs)


def test_a_guard_answering_the_wrong_number_of_flags_is_an_error(sd1, model_folder):
    (model_folder / "eiup_anchors.json").write_text(ANCHORS)
    with pytest.raises(ValueError, match="one per image"):
        sd1(PROMPTS, erase="red", guard=lambda images: [True], **KW)


def test_auto_guard_is_the_model_folders_and_steps_aside_for_a_fixed_strength(sd1, model_folder):
    from safetensors.torch import save_file

    from eiup.guard import GUARD_FILE
    from eiup.toy.detect import ConceptDetectorNet

    (model_folder / "eiup_anchors.json").write_text(ANCHORS)
    run = dict(erase="red", generator=gens(), **KW)
    unguarded = sd1(PROMPTS, **run)
    assert unguarded.guard_attempts is None  # no guard in this folder: "auto" is no guard
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in ConceptDetectorNet().state_dict().items()}, str(model_folder / GUARD_FILE))
    guarded = sd1(PROMPTS, **dict(run, generator=gens()))
    assert guarded.guard_attempts is not None and len(guarded.guard_flagged) == 3
    first = guarded.guard_attempts == 1  # images the guard passed at once are the preset's
    np.testing.assert_allclose(guarded.images[first], unguarded.images[first], atol=1e-5)
    fixed = sd1(PROMPTS, anchor_strength=1.0, **dict(run, generator=gens()))
    off = sd1(PROMPTS, guard=False, **dict(run, generator=gens()))
    assert fixed.guard_attempts is None and off.guard_attempts is None
    np.testing.assert_array_equal(off.images, unguarded.images)
    with pytest.raises(EraseConfigError, match="guard_ladder"):
        sd1(PROMPTS, guard=False, guard_ladder=[0.5, 1], **run)


def test_guard_thresholds_written_to_the_file_reach_the_models_guard(tmp_path):
    from safetensors.torch import save_file

    from eiup.guard import GUARD_FILE, model_guard, set_guard_thresholds
    from eiup.io import tensor_metadata
    from eiup.toy.detect import ConceptDetectorNet

    path = tmp_path / GUARD_FILE
    save_file({k: v.contiguous() for k, v in ConceptDetectorNet().state_dict().items()}, str(path),
              metadata={"seed": "23", "milder_threshold_chosen_on": "an older note"})
    plain = model_guard(tmp_path, ["red", "nudity"])
    assert plain.concepts == ["red"] and plain.threshold is None and plain.milder_threshold is None
    set_guard_thresholds(path, milder_threshold=0.05, note="chosen on a development set")
    assert tensor_metadata(path) == {"seed": "23", "milder_threshold": "0.05", "thresholds_chosen_on": "chosen on a development set"}
    guard = model_guard(tmp_path, ["red"])
    assert guard.threshold is None and guard.milder_threshold == 0.05
    set_guard_thresholds(path, threshold=0.4)  # replaces both thresholds and the note
    assert tensor_metadata(path) == {"seed": "23", "threshold": "0.4"} and model_guard(tmp_path, ["red"]).threshold == 0.4
    set_guard_thresholds(path, threshold=0.4, keep_threshold=0.7)
    guard = model_guard(tmp_path, ["red"])
    assert (guard.threshold, guard.milder_threshold, guard.keep_threshold) == (0.4, None, 0.7)
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="milder_threshold=.*give a probability in \\(0, 1\\)"):
            set_guard_thresholds(path, milder_threshold=bad)
        with pytest.raises(ValueError, match="keep_threshold=.*give a probability in \\(0, 1\\)"):
            set_guard_thresholds(path, keep_threshold=bad)
    assert tensor_metadata(path)["threshold"] == "0.4" and not list(tmp_path.glob("*.tmp"))


class Harming(Scripted):
    """A scripted guard that also says, per attempt, which clean images changed against the originals."""

    def __init__(self, flags_per_call, harmed_per_call):
        super().__init__(flags_per_call)
        self.harm, self.originals = list(harmed_per_call), []

    def harmed(self, images, originals):
        self.originals.append(np.asarray(originals))
        return self.harm.pop(0)


def test_a_guard_that_checks_the_rest_walks_down_from_harm_and_keeps_the_first_clean_draw(sd1, model_folder):
    from eiup.guard import NEGATIVE_PROMPT_GUIDANCE

    (model_folder / "eiup_anchors.json").write_text(ANCHORS)  # the preset: strength 1
    ladder = [0.5, 1.0, 2.0]
    # image 0: clean but harmed at 1, clean and unharmed at 0.5; image 1: clean but harmed at 1, seen at 0.5
    # (milder leaks), clean but harmed at 2; image 2: seen at 1, clean but harmed at the top. Images 1 and 2, clean
    # but harmed after their walks, get the negative-prompt draws: image 1's first is clean and unharmed (kept),
    # image 2's are all harmed, so it keeps its first clean draw (the top)
    last_resort = [[False, False], [False, True]] + [[False], [True]] * len(NEGATIVE_PROMPT_GUIDANCE)
    guard = Harming([[False, False, True], [False, True, False], [False]] + last_resort[0::2],
                    [[True, True, False], [False, False, True], [True]] + last_resort[1::2])
    out = sd1(PROMPTS, erase="red", guard=guard, guard_ladder=ladder, generator=gens(), return_original=True, **KW)
    assert guard.sizes == [3, 3, 1, 2] + [1] * len(NEGATIVE_PROMPT_GUIDANCE) and guard.flags == guard.harm == []
    assert out.guard_attempts.tolist() == [2, 4, 3 + len(NEGATIVE_PROMPT_GUIDANCE)]
    assert out.guard_flagged == [False, False, False] and out.guard_negative_prompt == [False, True, False]
    strengths = out.anchor_strengths["red"]
    assert strengths[0] == 0.5 and np.isnan(strengths[1]) and strengths[2] == 2.0  # image 1: drawn without erasure
    fixed = sd1(PROMPTS, erase="red", anchor_strength=[0.5, 1.0, 2.0], generator=gens(), **KW)
    np.testing.assert_allclose(out.images[[0, 2]], fixed.images[[0, 2]], atol=1e-5)
    negative = sd1(PROMPTS, negative_prompt=["red"] * 3, generator=gens(), **KW)
    np.testing.assert_allclose(out.images[1], negative.images[1], atol=1e-5)
    plain = sd1(PROMPTS, generator=gens(), **KW).images
    np.testing.assert_allclose(guard.originals[0], plain, atol=1e-5)  # compared with the images drawn without erasure
    np.testing.assert_allclose(out.original_images, plain, atol=1e-5)
    no_cfg = Harming([[False, False, True], [False, True, False], [False]], [[True, True, False], [False, False, True], [True]])
    out = sd1(PROMPTS, erase="red", guard=no_cfg, guard_ladder=ladder, generator=gens(), guidance_scale=1.0, **KW)
    assert no_cfg.sizes == [3, 3, 1] and not any(out.guard_negative_prompt)  # no guidance: no negative prompt to draw


def test_the_toy_guard_reads_its_concepts_and_compares_the_rest_with_the_original():
    from PIL import Image

    from eiup.guard import ToyGuard
    from eiup.toy.detect import HEADS, ConceptDetector
    from eiup.toy.render import render
    from eiup.toy.world import Obj, Scene

    def image(color, shape, background="white"):
        return render(Scene((Obj(color, shape),), background, layout_seed=5)).image

    guard = ToyGuard(ConceptDetector.load(), ["red"])
    assert guard([image("red", "circle"), image("blue", "circle")]) == [True, False]
    originals = [image("red", "circle")] * 3
    assert guard.harmed([image("blue", "circle"), image("blue", "square"), image("blue", "circle", "black")],
                        originals) == [False, True, True]  # the colour may change, not the shape or background
    night = ToyGuard(ConceptDetector.load(), ["night"])
    assert night.harmed([image("red", "circle", "white"), image("blue", "circle", "white")],
                        [image("red", "circle", "black")] * 2) == [False, True]
    assert ToyGuard(ConceptDetector.load(), ["red"], keep=False).harmed is None and guard.doubt is None
    circle, square = (np.asarray(image("blue", s), dtype=np.float32) for s in ("circle", "square"))
    unsure = Image.fromarray((0.7 * circle + 0.3 * square).round().astype(np.uint8))  # read as a circle, less surely
    (found,) = ConceptDetector.load().detect([unsure])
    p = float(found.objects[0].scores["shape"][HEADS["shape"].index("circle")])
    assert found.objects[0].shape == "circle" and 0.5 < p < 0.99
    assert guard.harmed([unsure], originals[:1]) == [False]
    assert ToyGuard(ConceptDetector.load(), ["red"], keep_threshold=p / 2).harmed([unsure], originals[:1]) == [False]
    assert ToyGuard(ConceptDetector.load(), ["red"], keep_threshold=(1 + p) / 2).harmed([unsure], originals[:1]) == [True]
    doubting = ToyGuard(ConceptDetector.load(), ["red"], milder_threshold=0.05)
    pair = [image("red", "circle"), image("blue", "circle")]
    scores = [d.score("color", "red") for d in ConceptDetector.load().detect(pair)]
    assert doubting.doubt(pair) == [s >= 0.05 for s in scores] and doubting.doubt(pair)[0]
    with pytest.raises(ValueError, match="the toy guard knows"):
        ToyGuard(ConceptDetector.load(), ["nudity"])
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="keep_threshold=.*give a probability in \\(0, 1\\)"):
            ToyGuard(ConceptDetector.load(), ["red"], keep_threshold=bad)


class Doubting(Harming):
    """... and which clean images it doubts."""

    def __init__(self, flags_per_call, harmed_per_call, doubts_per_call):
        super().__init__(flags_per_call, harmed_per_call)
        self.doubts = list(doubts_per_call)

    def doubt(self, images):
        return self.doubts.pop(0)


def test_a_milder_draw_the_guard_doubts_counts_as_seen(sd1, model_folder):
    (model_folder / "eiup_anchors.json").write_text(ANCHORS)  # the preset: strength 1
    guard = Doubting([[False, False, False], [False, False], [False]], [[True, True, False], [False, False], [True]],
                     [[True, False]])  # asked only about draws milder than the first
    out = sd1(PROMPTS, erase="red", guard=guard, guard_ladder=[0.5, 1.0, 2.0], generator=gens(), guidance_scale=1.0,
              **KW)  # without guidance: no negative-prompt draws after the walks
    # image 0: its milder draw doubted, so tried above the first strength (harmed there too)
    assert guard.sizes == [3, 2, 1] and out.guard_attempts.tolist() == [3, 2, 1] and guard.doubts == []
    np.testing.assert_array_equal(out.anchor_strengths["red"], [1.0, 0.5, 1.0])  # image 0's milder draw doubted
    assert out.guard_flagged == [False, False, False]
