"""Fine-tuning throughput (issue 4): micromerge's trainer against a minimal plain PyTorch loop.

Same model (micro-clip, 64 px), same data (synthetic pathology pairs, decoded once), same batch,
same optimiser, same number of steps, in one run. Throughput excludes decoding and set-up on both
sides (the trainer measures from its first step). Run: .venv/bin/python bench/finetune_bench.py [--steps 60]
On a GPU (issue 4's ViT-B/32 figure): --model ViT-B-32 --device cuda --batch-size 256 --steps 200;
both loops then run in bf16 autocast, the plain one copying each batch to the device as usual.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from micromerge.eval.pairs import decode_checked, load_pairs
from micromerge.eval.synthetic.generate import write_corpus
from micromerge.eval.zeroshot import autocast_for
from micromerge.finetune.config import FinetuneConfig
from micromerge.finetune.losses import clip_loss
from micromerge.finetune.trainer import run_finetune
from micromerge.merging.models import OPENAI_MEAN, OPENAI_STD, build_model, get_model_config, tokenizer_for


def plain_loop(data_dir: Path, steps: int, batch: int, lr: float, arch: str, device: torch.device) -> float:
    config = get_model_config(arch)
    torch.manual_seed(0)
    model = build_model(config).to(device)
    pairs = load_pairs(str(data_dir))
    size = config["vision_cfg"]["image_size"]
    data = decode_checked(pairs.payloads, pairs.captions, size, 0.05, str(data_dir), progress=False)
    tokens = tokenizer_for(config)(data.targets)
    mean = torch.tensor(OPENAI_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD, device=device).view(1, 3, 1, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.05)
    order = torch.randperm(len(data.targets), generator=torch.Generator().manual_seed(0))
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        index = order[(step * batch) % (len(order) - batch) :][:batch].numpy()
        pixels = torch.from_numpy(np.ascontiguousarray(data.pixels[np.sort(index)])).to(device)
        pixels = (pixels.float() / 255 - mean) / std
        with autocast_for(device, "bf16"):
            image_f, text_f, scale = model(pixels, tokens[torch.from_numpy(np.sort(index))].to(device))[:3]
            loss = clip_loss(image_f.float(), text_f.float(), scale.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model", default="micro-clip")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_corpus(folder / "pairs", "pathology", per_class=120, workers=os.cpu_count() or 2)
        torch.manual_seed(0)
        from safetensors.torch import save_file

        state = {
            k: v.contiguous()
            for k, v in build_model(get_model_config(args.model)).state_dict().items()
            if k != "attn_mask"
        }
        save_file(state, str(folder / "init.safetensors"), metadata={"micromerge.arch": args.model})
        plain = plain_loop(folder / "pairs", args.steps, args.batch_size, 5e-4, args.model, device)
        run_finetune(
            FinetuneConfig(
                mode="contrastive",
                base=str(folder / "init.safetensors"),
                data=str(folder / "pairs"),
                out=folder / "run",
                max_steps=args.steps,
                batch_size=args.batch_size,
                lr=5e-4,
                weight_decay=0.05,
                save_every=0,
                progress=False,
                device=args.device,
                precision="bf16",
            )
        )
        ours = json.loads((folder / "run" / "manifest.json").read_text())["images_per_s"]
    print(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "model": args.model,
                "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
                "batch": args.batch_size,
                "steps": args.steps,
                "micromerge_images_per_s": ours,
                "plain_pytorch_images_per_s": round(plain, 1),
                "ratio": round(ours / plain, 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
