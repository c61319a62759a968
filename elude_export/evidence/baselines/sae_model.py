"""TopK sparse autoencoder: the baseline ELUDe has to beat (Gao et al. 2024, "Scaling and
evaluating sparse autoencoders").

`z = relu(topk(W_enc (h' - b_dec) + b_enc))`, `h' ~ W_dec z + b_dec` on the layer's hidden
vector `h` (what `fc2` reads), standardised by one scalar so that learning rates transfer
between layers. Decoder columns are kept at unit norm, the encoder starts as the decoder's
transpose, `b_dec` starts at the data mean, and an AuxK loss (top-`aux_k` dead latents
reconstruct the residual) keeps latents from dying. Unlike ELUDe it is lossy: splicing its
reconstruction into the model changes outputs, which `evaluate` measures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from elude_export.models import model_batches
from elude_export.errors import DataError
from elude_export.layers import NeuronLayer
from elude_export.models import InputSpec
from elude_export.data.sources import ImageSource


@dataclass
class SAEConfig:
    """Training knobs; `target_fvu` stops early once held-out reconstruction is that good."""

    n_latents: int
    k: int = 32
    steps: int = 3000
    batch_size: int = 1024
    lr: float = 1e-3
    aux_k: int | None = None  # default: 2 * k, capped at n_latents // 2
    aux_coef: float = 1.0 / 32.0
    dead_after: int = 200  # steps without firing before a latent counts as dead
    target_fvu: float | None = None
    max_seconds: float | None = None  # wall-clock budget (benchmarks): stop at the next check after it
    check_every: int = 100
    seed: int = 0


@dataclass
class SAEHistory:
    steps: int = 0
    seconds: float = 0.0
    fvu: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out FVU)
    elapsed: list[float] = field(default_factory=list)  # training seconds at each FVU check
    dead_fraction: float = 0.0
    reached_target: bool = False


class TopKSAE(nn.Module):
    """k-sparse autoencoder on unscaled `h`; the standardisation is part of the module."""

    def __init__(self, d_in: int, n_latents: int, k: int):
        super().__init__()
        if not 1 <= k <= n_latents:
            raise DataError(f"SAE k must be in 1..{n_latents}, got {k}")
        self.k = k
        decoder = F.normalize(torch.randn(d_in, n_latents), dim=0)
        self.w_dec = nn.Parameter(decoder)
        self.w_enc = nn.Parameter(decoder.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("scale", torch.ones(()))

    @property
    def n_latents(self) -> int:
        return int(self.w_enc.shape[0])

    def pre_activations(self, h: torch.Tensor) -> torch.Tensor:
        return (h / self.scale - self.b_dec) @ self.w_enc.T + self.b_enc

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., n_latents) with at most k non-zero (non-negative) entries."""
        pre = self.pre_activations(h)
        values, index = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, index, values.relu())

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return (z @ self.w_dec.T + self.b_dec) * self.scale

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(h))

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.w_dec.data = F.normalize(self.w_dec.data, dim=0)


@torch.no_grad()
def fvu(sae: TopKSAE, h: torch.Tensor, batch_size: int = 8192) -> float:
    """Fraction of variance unexplained: sum ||h - h_hat||^2 / sum ||h - mean h||^2."""
    mean = h.mean(0, keepdim=True)
    error = total = 0.0
    for start in range(0, h.shape[0], batch_size):
        chunk = h[start:start + batch_size]
        error += float(((sae(chunk) - chunk) ** 2).sum())
        total += float(((chunk - mean) ** 2).sum())
    return error / max(total, 1e-12)


def train_sae(h: torch.Tensor, config: SAEConfig, device: torch.device | str = "cpu") -> tuple[TopKSAE, SAEHistory]:
    """Fit a TopK SAE on token activations `h` (T, d); 5% of tokens are held out for FVU checks."""
    with torch.enable_grad():  # callers (evaluate) run under no_grad
        return _train_sae(h, config, device)


def _train_sae(h: torch.Tensor, config: SAEConfig, device: torch.device | str) -> tuple[TopKSAE, SAEHistory]:
    device = torch.device(device)
    if h.ndim != 2 or h.shape[0] < 20:
        raise DataError(f"SAE needs (tokens, units) activations with at least 20 tokens, got {tuple(h.shape)}")
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    order = torch.randperm(h.shape[0], generator=generator)
    n_held = max(10, h.shape[0] // 20)
    held, train = h[order[:n_held]].to(device).float(), h[order[n_held:]].to(device).float()

    sae = TopKSAE(h.shape[1], config.n_latents, min(config.k, config.n_latents)).to(device)
    centred = train - train.mean(0, keepdim=True)
    sae.scale.fill_(float(centred.pow(2).sum(1).mean().sqrt().clamp_min(1e-8)))
    sae.b_dec.data = (train.mean(0) / sae.scale).to(device)
    aux_k = config.aux_k or max(1, min(2 * config.k, config.n_latents // 2))
    optimizer = torch.optim.Adam(sae.parameters(), lr=config.lr)
    since_fired = torch.zeros(config.n_latents, dtype=torch.long, device=device)
    history = SAEHistory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for step in range(1, config.steps + 1):
        index = torch.randint(train.shape[0], (min(config.batch_size, train.shape[0]),), generator=generator)
        batch = train[index.to(device)] / sae.scale
        pre = (batch - sae.b_dec) @ sae.w_enc.T + sae.b_enc
        values, top = pre.topk(sae.k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, top, values.relu())
        recon = z @ sae.w_dec.T + sae.b_dec
        variance = (batch - batch.mean(0, keepdim=True)).pow(2).sum(1).mean().clamp_min(1e-8)
        loss = (recon - batch).pow(2).sum(1).mean() / variance

        fired = torch.zeros(config.n_latents, dtype=torch.bool, device=device)
        fired[top[values > 0]] = True
        since_fired = torch.where(fired, torch.zeros_like(since_fired), since_fired + 1)
        dead = since_fired > config.dead_after
        if dead.any():
            # AuxK: the dead latents' top pre-activations must explain what the live ones missed
            residual = (batch - recon).detach()
            dead_pre = pre.masked_fill(~dead, float("-inf"))
            k_aux = min(aux_k, int(dead.sum()))
            aux_values, aux_top = dead_pre.topk(k_aux, dim=-1)
            z_aux = torch.zeros_like(pre).scatter(-1, aux_top, aux_values.relu())
            aux_recon = z_aux @ sae.w_dec.T
            loss = loss + config.aux_coef * (aux_recon - residual).pow(2).sum(1).mean() / variance

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sae.normalise_decoder()
        history.steps = step
        if step % config.check_every == 0 or step == config.steps:
            sae.eval()
            value = fvu(sae, held)
            sae.train()
            history.fvu.append((step, value))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            history.elapsed.append(time.perf_counter() - started)
            if config.target_fvu is not None and value <= config.target_fvu:
                history.reached_target = True
                break
            if config.max_seconds is not None and time.perf_counter() - started > config.max_seconds:
                break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    history.seconds = time.perf_counter() - started
    history.dead_fraction = float((since_fired > config.dead_after).float().mean())
    return sae.eval(), history


def in_layout(fn, h: torch.Tensor, channel_axis: int) -> torch.Tensor:
    """Apply a token-wise map (B, T, H) -> (B, T, H) to `h` in its own layout (tokens, or a feature map)."""
    from elude_export.layers import from_tokens, to_tokens

    return from_tokens(fn(to_tokens(h, channel_axis)), h, channel_axis)


@torch.no_grad()
def collect_hidden_tokens(
    model: nn.Module, layers: list[NeuronLayer], source: ImageSource, spec: InputSpec, max_tokens: int = 200_000,
    batch_size: int = 64, device: torch.device | str = "cpu", limit: int | None = None, seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Per layer, up to `max_tokens` rows of `h` (what fc2 reads), tokens sampled uniformly at random.

    Each token is kept with probability `max_tokens / (images * tokens)`, so memory stays bounded
    and every image contributes; the SAE trains on the same distribution ELUDe calibrates on.
    """
    device = torch.device(device)
    dtype = next(model.parameters()).dtype
    total_images = len(source) if limit is None else min(limit, len(source))
    generator = torch.Generator().manual_seed(seed)
    kept: dict[str, list[torch.Tensor]] = {layer.path: [] for layer in layers}
    layer_of = {layer.path: layer for layer in layers}

    def hook(path: str):
        def record(_module: nn.Module, args: tuple) -> None:
            h = layer_of[path].to_tokens(args[0].detach().float())  # (B, T, H) for a ViT and a CNN alike
            keep = min(1.0, max_tokens / max(1, total_images * h.shape[1]))
            h = h.reshape(-1, h.shape[-1])
            mask = torch.rand(h.shape[0], generator=generator) < keep
            kept[path].append(h[mask.to(h.device)].cpu())
        return record

    handles = [layer.consumer.register_forward_pre_hook(hook(layer.path)) for layer in layers]
    try:
        for _indices, batch in model_batches(source, spec, batch_size, device, dtype, limit):
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
    out = {path: torch.cat(rows)[:max_tokens] if rows else torch.zeros(0) for path, rows in kept.items()}
    if any(rows.shape[0] == 0 for rows in out.values()):
        raise DataError(f"no activations collected from {source.name}")
    return out


def train_layer_saes(model: nn.Module, layers: list[NeuronLayer], n_latents: dict[str, int], source: ImageSource,
                     spec: InputSpec, config: SAEConfig, batch_size: int = 64, device: torch.device | str = "cpu",
                     log=lambda _m: None) -> dict[str, TopKSAE]:
    """One SAE per layer on `source`'s tokens, `n_latents[path]` latents each (the layer's sub-units)."""
    tokens = collect_hidden_tokens(model, layers, source, spec, batch_size=batch_size, device=device, seed=config.seed)
    saes = {}
    for layer in layers:
        layer_config = SAEConfig(**{**vars(config), "n_latents": n_latents[layer.path]})
        saes[layer.path], history = train_sae(tokens[layer.path], layer_config, device)
        log(f"  SAE {layer.path}: {layer_config.n_latents} latents, k={saes[layer.path].k}, {history.steps} steps "
            f"in {history.seconds:.0f}s, held-out FVU {history.fvu[-1][1]:.4f}")
    return saes
