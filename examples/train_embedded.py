"""Train the embedded default ViT on the concept dataset and write its checkpoint + model card.

The committed checkpoint `elude_export/data/embedded_vit.safetensors` comes from running this
script with its defaults (the exact command is recorded in `embedded_vit.json`). It must be
trained well: an undertrained model has no stable concepts for ELUDe to split (METHOD.md).

    python examples/train_embedded.py                      # the committed checkpoint, CPU
    python examples/train_embedded.py --epochs 1 --train-size 512 --out-dir /tmp/x   # smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

if __package__ in (None, "") and str(Path(__file__).resolve().parents[1]) not in sys.path:
    # run as a script from a checkout without `pip install -e .`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elude_export.data.concepts import SPLITS, ConceptSet, load_split  # noqa: E402
from elude_export.models import normalize_images  # noqa: E402
from elude_export.models import (  # noqa: E402
    EMBEDDED_ARCH,
    EMBEDDED_WEIGHTS,
    create_embedded_model,
    embedded_input_spec,
)

DEFAULT_SEED = 0
DEFAULT_EPOCHS = 12
DEFAULT_BATCH = 128
DEFAULT_LR = 2e-3
DEFAULT_WEIGHT_DECAY = 0.05
WARMUP_FRACTION = 0.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument(
        "--train-size", type=int, default=None, help="images of the train split to use (default: all of it)"
    )
    parser.add_argument("--test-size", type=int, default=None, help="images of the test split (default: all)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--weight-decay", type=float, default=DEFAULT_WEIGHT_DECAY)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    parser.add_argument("--no-flip", action="store_true", help="disable random horizontal flips")
    parser.add_argument(
        "--out-dir", type=Path, default=EMBEDDED_WEIGHTS.parent, help="where embedded_vit.{safetensors,json} go"
    )
    return parser.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    """`auto` takes CUDA when present; asking for CUDA without it is an error, not a silent fallback."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def subset(data: ConceptSet, size: int | None) -> ConceptSet:
    """The first `size` images; the splits are already in random order, so this stays balanced."""
    if size is None or size >= len(data):
        return data
    return ConceptSet(
        images=data.images[:size],
        labels=data.labels[:size],
        concepts=data.concepts[:size],
        factors={key: value[:size] for key, value in data.factors.items()},
    )


def lr_at(step: int, total: int, base_lr: float) -> float:
    """Linear warmup, then cosine decay to zero: stable start for a ViT, no tuning of a step schedule."""
    warmup = max(1, int(WARMUP_FRACTION * total))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, embeddings and tokens (the usual ViT recipe)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        skip = param.ndim <= 1 or name.endswith(("pos_embed", "cls_token"))
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    """Top-1 accuracy in eval mode."""
    model.eval()
    correct = 0
    for start in range(0, inputs.shape[0], 500):
        logits = model(inputs[start : start + 500].to(device))
        correct += int((logits.argmax(dim=1).cpu() == labels[start : start + 500]).sum())
    return correct / max(1, inputs.shape[0])


def train(args: argparse.Namespace) -> tuple[nn.Module, dict]:
    """Fixed seed, deterministic data order: the same command gives the same weights on CPU."""
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    device = resolve_device(args.device)
    spec = embedded_input_spec()
    train_set = subset(load_split("train"), args.train_size)
    test_set = subset(load_split("test"), args.test_size)
    x_train = normalize_images(train_set.images, spec)
    y_train = torch.as_tensor(train_set.labels)
    x_test = normalize_images(test_set.images, spec)
    y_test = torch.as_tensor(test_set.labels)

    model = create_embedded_model(pretrained=False).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999))
    steps_per_epoch = math.ceil(len(train_set) / args.batch_size)
    total = args.epochs * steps_per_epoch
    order_rng = torch.Generator().manual_seed(args.seed)
    step = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_set), generator=order_rng)
        flips = torch.rand(len(train_set), generator=order_rng) < 0.5
        running, seen = 0.0, 0
        for first in range(0, len(train_set), args.batch_size):
            index = order[first : first + args.batch_size]
            batch = x_train[index]
            if not args.no_flip:
                # shape and colour concepts are invariant to a horizontal flip (not a vertical one: triangles)
                flip = flips[first : first + args.batch_size]
                batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, args.lr)
            loss = nn.functional.cross_entropy(model(batch.to(device)), y_train[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            running += loss.item() * index.shape[0]
            seen += index.shape[0]
            step += 1
        test_acc = evaluate(model, x_test, y_test, device)
        elapsed = time.perf_counter() - start
        print(
            f"epoch {epoch + 1}/{args.epochs}  loss {running / seen:.4f}  test acc {test_acc:.4f}  {elapsed:.0f}s",
            flush=True,
        )
    train_seconds = time.perf_counter() - start
    # wall time depends on who else shares the CPU; process CPU time says what the training cost
    cpu_seconds = time.process_time() - cpu_start
    final_acc = evaluate(model, x_test, y_test, device)
    stats = {
        "train_size": len(train_set),
        "test_size": len(test_set),
        "test_accuracy": round(final_acc, 4),
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(cpu_seconds, 1),
        "device": str(device),
    }
    return model.cpu().eval(), stats


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write via a temp file in the same directory + os.replace: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a committed file must be readable
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save(model: nn.Module, card: dict, out_dir: Path) -> tuple[Path, Path]:
    """Checkpoint (state dict only, safetensors) and model card JSON, each written atomically."""
    from safetensors.torch import save

    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    weights_path = out_dir / EMBEDDED_WEIGHTS.name
    card_path = out_dir / EMBEDDED_WEIGHTS.with_suffix(".json").name
    atomic_write_bytes(weights_path, save(state))
    atomic_write_bytes(card_path, (json.dumps(card, indent=2) + "\n").encode())
    return weights_path, card_path


def training_command(argv: list[str] | None) -> str:
    """The command as typed, relative to the repository root, so the card tells how to reproduce it."""
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", "examples/train_embedded.py", *args])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import timm

    model, stats = train(args)
    card = {
        "model": "embedded",
        "architecture": dict(EMBEDDED_ARCH, family="timm VisionTransformer"),
        "dataset": "elude_export.data.concepts",
        "splits": {"train": list(SPLITS["train"]), "test": list(SPLITS["test"])},
        "training_command": training_command(argv),
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "schedule": f"AdamW, linear warmup {WARMUP_FRACTION:.0%} of steps then cosine to 0",
        "augmentation": "none" if args.no_flip else "random horizontal flip",
        **stats,
        "threads": args.threads,
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    weights_path, card_path = save(model, card, args.out_dir)
    print(f"test accuracy {stats['test_accuracy']:.4f} in {stats['train_seconds']:.0f}s")
    print(f"wrote {weights_path} and {card_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
