"""Train the bundled digits ViT (`load_model("embedded-digits")`) and write its checkpoint + card.

Same architecture as the embedded concept model (4 blocks, width 96, patch 4, 32x32 RGB) with
10 classes, trained on scikit-learn's digits (`digits:train`, 8x8 upsampled to 32x32 RGB) and
scored on `digits:test` (500 held-out images). It gives ELUDe a second model whose labels are
a real task (METHOD.md's first measurement). Writes, each atomically (temp file + os.replace):
`elude_export/data/digits_vit.safetensors` and `elude_export/data/digits_vit.json`.

    python examples/train_digits.py                                 # the committed checkpoint, CPU
    python examples/train_digits.py --epochs 2 --out-dir /tmp/x     # smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

if __package__ in (None, "") and str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elude_export.models import normalize_images  # noqa: E402
from elude_export.models import (  # noqa: E402
    EMBEDDED_ARCH,
    EMBEDDED_DIGITS_WEIGHTS,
    create_embedded_model,
    embedded_input_spec,
)
from elude_export.data.sources import open_source  # noqa: E402

# the shared recipe pieces live in the sibling script (its folder is on sys.path when run)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_embedded import atomic_write_bytes, param_groups, resolve_device  # noqa: E402

DEFAULT_EPOCHS = 60
DEFAULT_BATCH = 64
DEFAULT_LR = 1e-3
DEFAULT_WEIGHT_DECAY = 0.05
MAX_ROTATE_DEG = 12.0  # digits are not flip-invariant; small rotations, scalings and shifts are safe
SCALE_RANGE = (0.85, 1.15)
MAX_SHIFT = 0.25  # of the half-width: one of the 8 original pixels
DIGIT_SIZE = 8  # scikit-learn's digits; the source upsamples them by nearest neighbour
DROP_PATH = 0.1  # stochastic depth while training only: it leaves the state dict unchanged
# 4x nearest upsampling + 4x4 patches make every token one constant pixel, and the block's
# LayerNorm then removes its intensity scale: with timm's tiny position init (std 0.02) the
# tokens barely say *where* they are and training stalls near chance. A larger position init
# (same architecture, same state dict) lets it learn in a few epochs.
POS_EMBED_STD = 0.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--weight-decay", type=float, default=DEFAULT_WEIGHT_DECAY)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    parser.add_argument("--out-dir", type=Path, default=EMBEDDED_DIGITS_WEIGHTS.parent)
    return parser.parse_args(argv)


def lr_at(step: int, total: int, base_lr: float, warmup_fraction: float = 0.05) -> float:
    """Linear warmup then cosine to zero (the usual small-ViT schedule)."""
    warmup = max(1, int(warmup_fraction * total))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def random_affine(batch: torch.Tensor, generator: torch.Generator, background: float) -> torch.Tensor:
    """Random rotation, scaling and shift, bilinear, filled with the background."""
    n = batch.shape[0]
    uniform = lambda *shape: torch.rand(*shape, generator=generator) * 2 - 1  # noqa: E731
    angle = uniform(n) * math.radians(MAX_ROTATE_DEG)
    scale = SCALE_RANGE[0] + (uniform(n) + 1) / 2 * (SCALE_RANGE[1] - SCALE_RANGE[0])
    shift = uniform(n, 2) * MAX_SHIFT
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = nn.functional.affine_grid(theta, list(batch.shape), align_corners=False)
    moved = nn.functional.grid_sample(batch - background, grid, padding_mode="zeros", align_corners=False)
    return moved + background


def augment(batch: torch.Tensor, generator: torch.Generator, background: float) -> torch.Tensor:
    """Warp at the digits' own 8x8 resolution, then upsample by nearest neighbour again.

    Test images are 8x8 digits upsampled 4x, so each 4x4 patch (one token) is one constant
    pixel; warping the 32x32 image instead would train on blurred, grid-misaligned patches
    that never occur at test time (that cost ~6 points of test accuracy).
    """
    factor = batch.shape[-1] // DIGIT_SIZE
    small = random_affine(batch[..., ::factor, ::factor], generator, background)
    return small.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def enable_drop_path(model: nn.Module, rate: float) -> None:
    from timm.layers import DropPath

    for block in model.blocks:
        block.drop_path1, block.drop_path2 = DropPath(rate), DropPath(rate)


@torch.no_grad()
def accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    model.eval()
    predictions = torch.cat([model(inputs[i:i + 500].to(device)).argmax(1).cpu() for i in range(0, len(inputs), 500)])
    return float((predictions == labels).float().mean())


def train(args: argparse.Namespace) -> tuple[nn.Module, dict]:
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    device = resolve_device(args.device)
    spec = embedded_input_spec()
    train_source, test_source = open_source("digits:train"), open_source("digits:test")
    x_train = normalize_images(train_source.load(np.arange(len(train_source))), spec)
    y_train = torch.as_tensor(train_source.labels)
    x_test = normalize_images(test_source.load(np.arange(len(test_source))), spec)
    y_test = torch.as_tensor(test_source.labels)

    model = create_embedded_model(pretrained=False, digits=True).to(device)
    enable_drop_path(model, DROP_PATH)
    with torch.no_grad():
        model.pos_embed.normal_(0.0, POS_EMBED_STD)
    background = (0.0 - spec.mean[0]) / spec.std[0]  # a black pixel after normalisation
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr)
    total = args.epochs * math.ceil(len(x_train) / args.batch_size)
    generator = torch.Generator().manual_seed(args.seed)
    step, started = 0, time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        running = 0.0
        for first in range(0, len(x_train), args.batch_size):
            index = order[first:first + args.batch_size]
            batch = augment(x_train[index], generator, background)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, args.lr)
            loss = nn.functional.cross_entropy(model(batch.to(device)), y_train[index].to(device), label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            running += loss.item() * len(index)
            step += 1
        if (epoch + 1) % 5 == 0 or epoch + 1 == args.epochs:
            print(f"epoch {epoch + 1}/{args.epochs}  loss {running / len(x_train):.4f}  "
                  f"test acc {accuracy(model, x_test, y_test, device):.4f}  {time.perf_counter() - started:.0f}s",
                  flush=True)
    stats = {"train_size": len(x_train), "test_size": len(x_test),
             "test_accuracy": round(accuracy(model, x_test, y_test, device), 4),
             "train_seconds": round(time.perf_counter() - started, 1), "device": str(device)}
    return model.cpu().eval(), stats


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import timm
    from safetensors.torch import save

    model, stats = train(args)
    card = {
        "model": "embedded-digits",
        "architecture": dict(EMBEDDED_ARCH, num_classes=10, family="timm VisionTransformer"),
        "dataset": "sklearn.datasets.load_digits via open_source('digits:train' / 'digits:test'), 8x8 -> 32x32 RGB",
        "training_command": shlex.join(["python", "examples/train_digits.py",
                                        *(sys.argv[1:] if argv is None else argv)]),
        "seed": args.seed, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "weight_decay": args.weight_decay,
        "schedule": "AdamW, linear warmup 5% then cosine to 0, label smoothing 0.1",
        "init": f"timm default, position embedding ~ N(0, {POS_EMBED_STD}^2)",
        "augmentation": f"random affine at 8x8 then nearest 4x upsampling: rotation +-{MAX_ROTATE_DEG} deg, "
                        f"scale {SCALE_RANGE}, shift +-{MAX_SHIFT} of the half-width; drop path {DROP_PATH}",
        **stats, "threads": args.threads, "torch_version": torch.__version__, "timm_version": timm.__version__,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    weights = args.out_dir / EMBEDDED_DIGITS_WEIGHTS.name
    card_path = args.out_dir / EMBEDDED_DIGITS_WEIGHTS.with_suffix(".json").name
    atomic_write_bytes(weights, save(state))
    atomic_write_bytes(card_path, (json.dumps(card, indent=2) + "\n").encode())
    print(f"test accuracy {stats['test_accuracy']:.4f} in {stats['train_seconds']:.0f}s")
    print(f"wrote {weights} and {card_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
