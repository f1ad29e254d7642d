"""PyTorch/diffusers side of the CPU comparison in `bench/src/bin/pipeline.rs`.

Installs nothing itself: `python3 -m pip install torch diffusers transformers` first (several GB with
PyPI's default torch build). Usage:
    python3 bench/torch_unet.py sd15 1 4 16      # SD 1.5-sized U-Net, random weights, 512x512, CFG batch
    python3 bench/torch_unet.py fixtures          # the tiny reference pipelines, 8 steps, batch 1/4/16
BENCH_DEVICE=cuda runs on the GPU (after a warm-up, synchronising before each clock read).
"""
import os
import sys
import time

import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel

torch.set_grad_enabled(False)
torch.manual_seed(0)
DEVICE = os.environ.get("BENCH_DEVICE", "cpu")
# float32 as fresco computes it: no TF32 convolutions (PyTorch's default on GPUs) or matmuls.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


def sync():
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


if sys.argv[1] == "sd15":
    unet = UNet2DConditionModel(
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, sample_size=64).eval().to(DEVICE)
    print("batch  s/evaluation (cfg doubles the batch)")
    for b in map(int, sys.argv[2:] or ["1"]):
        x = torch.randn(2 * b, 4, 64, 64, device=DEVICE)
        ctx = torch.randn(2 * b, 77, 768, device=DEVICE)
        if DEVICE != "cpu":
            unet(x, 500, encoder_hidden_states=ctx)
            sync()
        t = time.perf_counter()
        unet(x, 500, encoder_hidden_states=ctx)
        sync()
        print(f"{b:>5} {time.perf_counter() - t:>14.2f}")
else:
    root = "tests/fixtures/models/"
    # The same columns as fresco's bench: the denoiser's share per step, and the prompt encoding and
    # VAE decode of the batch, timed by wrapping the pipeline's own components.
    print(f"{'fixture':<10} {'batch':>5} {'s/step':>8} {'images/s':>9} {'s encode':>9} {'s decode':>9}")
    for model in ["tiny-sd15", "tiny-sdxl", "tiny-sd3", "tiny-flux"]:
        if not os.path.isdir(root + model):
            print(f"{model:<10} not present, skipped")
            continue
        pipe = DiffusionPipeline.from_pretrained(root + model, torch_dtype=torch.float32).to(DEVICE)
        spent = {}

        def timed(name, f):
            def call(*args, **kwargs):
                sync()
                t = time.perf_counter()
                out = f(*args, **kwargs)
                sync()
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
                return out
            return call

        denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
        denoiser.forward = timed("denoise", denoiser.forward)
        pipe.encode_prompt = timed("encode", pipe.encode_prompt)
        pipe.vae.decode = timed("decode", pipe.vae.decode)
        for b in [1, 4, 16]:
            prompts = [f"a red circle number {i}" for i in range(b)]
            pipe(prompts, num_inference_steps=8, height=64, width=64)
            sync()
            spent.clear()
            t = time.perf_counter()
            pipe(prompts, num_inference_steps=8, height=64, width=64)
            sync()
            total = time.perf_counter() - t
            print(f"{model:<10} {b:>5} {spent['denoise'] / 8:>8.4f} {b / total:>9.2f} {spent['encode']:>9.4f} {spent['decode']:>9.4f}")
