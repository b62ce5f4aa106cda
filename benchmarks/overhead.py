"""Cost of erasure versus a plain generation: wall time and peak memory (issue #5).

Variants, all built on the SAME components and measured in ONE run, round-robin (the order is
rotated every repetition), medians reported, ratios to ``plain`` of the same run:

    plain        diffusers StableDiffusionPipeline
    eiup-single  EIUPPipeline, erase_mode="single", guard=False (the erasure itself)
    eiup-guarded EIUPPipeline, erase_mode="single", the library's defaults: the closed loop
                 (eiup.guard) on a model folder with a guard (the toy model): a plain draw to compare
                 with and the redraws it asks for; on a model without one the same as eiup-single
    eiup-dual    EIUPPipeline, erase_mode="dual", guard=False
    sld-medium   diffusers StableDiffusionPipelineSafe, SafetyConfig.MEDIUM (warm-up scaled to the
                 step count as in eiup.bench), safety_checker=None

Models:
    toy   the bundled toy-world model (64x64, 25 steps), batch 1 and 8 (``--toy-model PATH``);
    sd15  the Stable Diffusion 1.5 architecture (real UNet / VAE / CLIP-L configs) with random
          weights, no download; on CPU 256x256 and 2 steps by default, on CUDA 512x512 x 50 steps.

Memory:
    cuda  ``torch.cuda.max_memory_allocated`` (peak reset before every call), and its increase
          over ``memory_allocated`` before the call;
    cpu   peak RSS of the process during each timed call: the kernel's high-water mark VmHWM,
          reset before the call through /proc/self/clear_refs (exact; a psutil thread sampling
          every 1 ms is the fallback where the reset is not allowed); glibc's free memory is
          returned to the OS (malloc_trim) before the call. RSS includes allocator slack, so in
          addition the untimed warm-up call (1 step, same shapes) runs under torch.profiler with
          profile_memory=True and reports the exact peak of live tensor bytes above the start
          ("tensors+"); it is deterministic, so one call per variant suffices.

Examples::

    python benchmarks/overhead.py                                             # CPU, toy + sd15 (b1)
    python benchmarks/overhead.py --models sd15 --sd15-batches 1 8 --steps 1  # CPU, SD1.5 batch 8 (long)
    python benchmarks/overhead.py --device cuda --resolution 512 --steps 50   # GPU
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

VARIANTS = ("plain", "eiup-single", "eiup-guarded", "eiup-dual", "sld-medium")
PROMPT = "a red star on a white background"
CONCEPT = "red"
MIB = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


LIBC = _libc()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _hwm_resettable() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
        return True
    except OSError:
        return False
    except KeyError:
        return False


class CpuPeak:
    """Peak RSS during a block: VmHWM after a reset, or a psutil sampling thread (every 1 ms)."""

    def __init__(self):
        self.exact = sys.platform.startswith("linux") and _hwm_resettable()
        self.before = self.peak = 0

    def __enter__(self):
        gc.collect()
        if LIBC is not None:
            LIBC.malloc_trim(0)
        if self.exact:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.before = _status_kib("VmRSS") * 1024
        else:
            import psutil

            proc = psutil.Process()
            self.before = proc.memory_info().rss
            self._stop = threading.Event()
            self._max = self.before

            def sample():
                while not self._stop.is_set():
                    self._max = max(self._max, proc.memory_info().rss)
                    self._stop.wait(0.001)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.exact:
            self.peak = _status_kib("VmHWM") * 1024
        else:
            self._stop.set()
            self._thread.join()
            self.peak = self._max
        return False


class CudaPeak:
    def __init__(self, device):
        self.device = device
        self.before = self.peak = 0

    def __enter__(self):
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.before = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device)
        return False


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


def default_toy_model() -> Path | None:
    from eiup.models import default_model_path

    for p in (default_model_path(), Path("/tmp/toysmoke/pipeline")):
        if (p / "model_index.json").is_file():
            return p
    return None


def load_toy(path, device, dtype):
    from eiup.models import load_pipeline

    return load_pipeline(str(path), device=device, dtype=dtype)


def build_sd15(device, dtype, tmpdir):
    """SD 1.5 architecture (real configs), random weights, toy-world CLIP tokenizer; an EIUPPipeline."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from eiup.pipeline import EIUPPipeline
    from eiup.toy.tokenizer import build_clip_tokenizer
    from eiup.toy.world import words

    tok = build_clip_tokenizer(words(), Path(tmpdir) / "tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        ))
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    pipe = EIUPPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tok, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    for m in (unet, vae, text_encoder):
        m.eval()
    return pipe.to(device=device, dtype=dtype)


class Variants:
    """The four pipelines on one set of components, plus a UNet timer shared by all of them."""

    def __init__(self, eiup_pipe, steps: int, decode: bool, prompt: str = PROMPT, concept: str = CONCEPT):
        from diffusers import StableDiffusionPipeline
        from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig, StableDiffusionPipelineSafe

        c = eiup_pipe.components
        self.eiup = eiup_pipe
        self.plain = StableDiffusionPipeline(**c)
        self.sld = StableDiffusionPipelineSafe(
            vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], unet=c["unet"],
            scheduler=c["scheduler"], safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        self.prompt, self.concept = prompt, concept
        self.sld.safety_concept = concept
        self.sld_medium = dict(SafetyConfig.MEDIUM)
        for p in (self.eiup, self.plain, self.sld):
            p.set_progress_bar_config(disable=True)
        self.decode = decode
        if not decode:  # SLD always decodes: skip its VAE like output_type="latent" does for the others
            self.sld.decode_latents = lambda latents: latents.permute(0, 2, 3, 1).float().cpu().numpy()
        self.device = eiup_pipe.device
        self.unet_seconds = 0.0
        self._t0 = 0.0
        unet = c["unet"]
        unet.register_forward_pre_hook(self._unet_start)
        unet.register_forward_hook(self._unet_end)
        self.steps = steps

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _unet_start(self, *_):
        self._sync()
        self._t0 = time.perf_counter()

    def _unet_end(self, *_):
        self._sync()
        self.unet_seconds += time.perf_counter() - self._t0

    def run(self, variant: str, batch: int, height: int, steps: int | None = None):
        steps = steps or self.steps
        gens = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]
        common = dict(num_inference_steps=steps, guidance_scale=7.5, generator=gens, height=height, width=height)
        prompts = [self.prompt] * batch
        out_type = "np" if self.decode else "latent"
        if variant == "plain":
            return self.plain(prompts, output_type=out_type, **common)
        if variant in ("eiup-single", "eiup-dual"):
            return self.eiup(prompts, erase=[self.concept], erase_scale=-1.0, erase_mode=variant.split("-")[1],
                             guard=False, output_type=out_type, **common)
        if variant == "eiup-guarded":
            return self.eiup(prompts, erase=[self.concept], erase_scale=-1.0, output_type=out_type, **common)
        if variant == "sld-medium":
            sld = dict(self.sld_medium)
            sld["sld_warmup_steps"] = int(round(sld["sld_warmup_steps"] * steps / 50))
            return self.sld(prompts, output_type="np", **common, **sld)
        raise ValueError(variant)


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------


def tensor_peak_increase(fn) -> int:
    """Exact peak of live CPU tensor bytes above the start while ``fn()`` runs (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()  # nothing left over from earlier calls may be freed (counted negative) during the call
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0]
    return max([0, *totals])


def measure(v: Variants, variant: str, batch: int, height: int) -> dict:
    peak = CudaPeak(v.device) if v.device.type == "cuda" else CpuPeak()
    v.unet_seconds = 0.0
    with peak:
        v._sync()
        t0, c0 = time.perf_counter(), time.process_time()
        out = v.run(variant, batch, height)
        v._sync()
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    del out
    return dict(seconds=seconds, cpu_seconds=cpu_seconds, unet_seconds=v.unet_seconds, peak=peak.peak,
                before=peak.before, exact_peak=getattr(peak, "exact", True))


def run_case(v: Variants, model: str, batch: int, height: int, reps: int, variants, bar) -> dict:
    tensors = {}
    for variant in variants:  # warm-up (same shapes, 1 step), not timed; on CPU it gives the tensor peak
        bar.set_postfix_str(f"{model} b{batch} warm-up {variant}")
        if v.device.type == "cpu":
            tensors[variant] = tensor_peak_increase(lambda: v.run(variant, batch, height, steps=1))
        else:
            v.run(variant, batch, height, steps=1)
        bar.update(1)
    samples = {name: [] for name in variants}
    for r in range(reps):
        k = r % len(variants)
        for variant in variants[k:] + variants[:k]:  # round-robin, rotated
            bar.set_postfix_str(f"{model} b{batch} rep {r + 1}/{reps} {variant}")
            samples[variant].append(measure(v, variant, batch, height))
            bar.update(1)
    rows = {}
    for variant, s in samples.items():
        med = lambda key: statistics.median(x[key] for x in s)  # noqa: E731
        rows[variant] = dict(
            seconds=med("seconds"), seconds_per_image=med("seconds") / batch, cpu_seconds=med("cpu_seconds"),
            unet_seconds=med("unet_seconds"), peak=med("peak"),
            peak_increase=statistics.median(x["peak"] - x["before"] for x in s),
            tensor_peak_increase=tensors.get(variant), samples=s,
        )
    base = rows.get("plain")

    def ratio(a, b):
        return a / b if a is not None and b else None

    for row in rows.values():
        if base:
            for key in ("seconds", "cpu_seconds", "unet_seconds", "peak", "peak_increase", "tensor_peak_increase"):
                row[f"{key}_ratio"] = ratio(row[key], base[key])
    return dict(model=model, batch=batch, resolution=height, steps=v.steps, reps=reps, decode=v.decode, variants=rows)


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown(cases: list[dict], meta: dict) -> str:
    cpu = not meta["device"].startswith("cuda")
    lines = [
        f"# EIUP overhead ({meta['device']}, {meta['dtype']}, torch {meta['torch']}, diffusers {meta['diffusers']})",
        "",
        "Medians of round-robin repetitions; `x` columns are ratios to `plain` of the same run.",
        "time: wall time of the whole call; CPU: process CPU time (robust to other jobs on the machine); "
        "UNet: time inside the UNet's forward.",
        f"peak: {meta['memory_method']}; peak+: the peak minus the memory held just before the call.",
    ]
    if cpu:
        lines.append("tensors+: exact peak of live tensor bytes during a 1-step call (torch.profiler), above the start.")
    head = "| model | res | steps | batch | variant | s/image | time x | CPU x | UNet x | peak MiB | peak x | peak+ MiB | peak+ x |"
    if cpu:
        head += " tensors+ MiB | tensors+ x |"
    lines += ["", head, "|" + "---|" * (head.count("|") - 1)]
    for c in cases:
        for name, r in c["variants"].items():
            decode = "" if c["decode"] else " (no VAE)"
            line = (
                f"| {c['model']} | {c['resolution']}{decode} | {c['steps']} | {c['batch']} | {name} | "
                f"{r['seconds_per_image']:.3f} | {_fmt(r.get('seconds_ratio'), '.3f')} | "
                f"{_fmt(r.get('cpu_seconds_ratio'), '.3f')} | {_fmt(r.get('unet_seconds_ratio'), '.3f')} | "
                f"{r['peak'] / MIB:.0f} | {_fmt(r.get('peak_ratio'), '.3f')} | {r['peak_increase'] / MIB:.1f} | "
                f"{_fmt(r.get('peak_increase_ratio'), '.3f')} |"
            )
            if cpu:
                t = r.get("tensor_peak_increase")
                line += f" {_fmt(None if t is None else t / MIB, '.1f')} | {_fmt(r.get('tensor_peak_increase_ratio'), '.3f')} |"
            lines.append(line)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--models", nargs="+", default=["toy", "sd15"], choices=["toy", "sd15"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--toy-model", default=None, help="toy pipeline folder (default: the bundled one, else /tmp/toysmoke/pipeline)")
    p.add_argument("--toy-batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--toy-steps", type=int, default=25)
    p.add_argument("--toy-reps", type=int, default=None,
                   help="default 5, 10 at batch 1 whose calls are short and noisier (3 and 6 with --quick)")
    p.add_argument("--sd15-batches", nargs="+", type=int, default=None,
                   help="default 1 on CPU (batch 8 at 256 px costs ~6 min per repetition on one core), 1 8 on CUDA")
    p.add_argument("--resolution", type=int, default=None, help="sd15 resolution (default 256 on CPU, 512 on CUDA)")
    p.add_argument("--steps", type=int, default=None, help="sd15 steps (default 2 on CPU, 50 on CUDA)")
    p.add_argument("--sd15-reps", type=int, default=None, help="default 3 (2 with --quick)")
    p.add_argument("--decode", choices=["auto", "yes", "no"], default="auto",
                   help="VAE decode in the timed call; auto: yes except sd15 on CPU (its decode costs ~10 s/image "
                        "there and is identical work in plain, single and SLD)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (toy 3, sd15 2) and sd15 1 step on CPU")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (default 1: shared machine)")
    p.add_argument("--prompt", default=PROMPT, help=f"the prompt of every call (default {PROMPT!r}, which names the "
                   "concept; e.g. 'an image of a strawberry in the fog' --concept heart for a prompt that implies it)")
    p.add_argument("--concept", default=CONCEPT, help=f"the concept erased (default {CONCEPT!r})")
    p.add_argument("--out", default="bench-out/overhead", help="folder for overhead.md / overhead.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm.auto import tqdm

    import diffusers

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda requested but CUDA is not available")
    dtype = torch.float16 if cuda else torch.float32
    if not cuda:
        torch.set_num_threads(args.threads)
        torch.set_flush_denormal(True)
    toy_base = 3 if args.quick else 5
    toy_reps = {b: args.toy_reps or (2 * toy_base if b == 1 else toy_base) for b in args.toy_batches}
    sd15_reps = args.sd15_reps or (2 if args.quick else 3)
    sd15_batches = args.sd15_batches or ([1, 8] if cuda else [1])
    sd15_res = args.resolution or (512 if cuda else 256)
    sd15_steps = args.steps or (50 if cuda else (1 if args.quick else 2))
    variants = [v for v in VARIANTS if v in args.variants]

    plan = []  # (model, batches, res, steps, reps, decode)
    if "toy" in args.models:
        toy_path = Path(args.toy_model) if args.toy_model else default_toy_model()
        if toy_path is None:
            sys.exit("no toy model: pass --toy-model /path/to/pipeline (e.g. /tmp/toysmoke/pipeline)")
        plan.append(("toy", args.toy_batches, None, args.toy_steps, toy_reps, args.decode != "no"))
    if "sd15" in args.models:
        decode = args.decode == "yes" or (args.decode == "auto" and cuda)
        plan.append(("sd15", sd15_batches, sd15_res, sd15_steps, {b: sd15_reps for b in sd15_batches}, decode))

    total = sum(len(variants) * (reps[b] + 1) for _, batches, _, _, reps, _ in plan for b in batches)
    bar = tqdm(total=total, desc="overhead", unit="call", dynamic_ncols=True)
    cases = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for model, batches, res, steps, reps, decode in plan:
            t_model = time.perf_counter()
            bar.set_postfix_str(f"loading {model}")
            pipe = load_toy(toy_path, device, dtype) if model == "toy" else build_sd15(device, dtype, tmp)
            res = res or pipe.unet.config.sample_size * pipe.vae_scale_factor
            v = Variants(pipe, steps, decode, args.prompt, args.concept)
            for b in batches:
                cases.append(run_case(v, model, b, res, reps[b], variants, bar))
                cases[-1]["model_path"] = str(toy_path) if model == "toy" else "sd15-architecture, random weights"
            tqdm.write(f"{model}: {time.perf_counter() - t_model:.0f} s")
            del v, pipe
            gc.collect()
    bar.close()

    memory_method = (
        "torch.cuda.max_memory_allocated" if cuda
        else ("process RSS high-water mark (VmHWM reset per call)" if CpuPeak().exact else "process RSS sampled every 1 ms (psutil)")
    )
    meta = dict(
        device=str(device) + (f" ({torch.cuda.get_device_name(device)})" if cuda else f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} thread)"),
        dtype=str(dtype).replace("torch.", ""), torch=torch.__version__, diffusers=diffusers.__version__,
        memory_method=memory_method, prompt=args.prompt, concept=args.concept, argv=sys.argv[1:],
        wall_seconds=time.perf_counter() - started,
    )
    md = markdown(cases, meta)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.md").write_text(md)
    (out / "overhead.json").write_text(json.dumps(dict(meta=meta, cases=cases), indent=1))
    print(f"wrote {out / 'overhead.md'} and {out / 'overhead.json'} ({meta['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
