"""TopK SAE baseline: learns planted sparse structure, keeps its sparsity and decoder norms."""

from __future__ import annotations

import pytest
import torch

from elude_export.errors import DataError
from elude_export.layers import find_layers
from elude_export.models import create_embedded_model, embedded_input_spec
from elude_export.evidence.baselines.sae_model import SAEConfig, TopKSAE, collect_hidden_tokens, fvu, train_sae
from elude_export.data.sources import ArraySource


pytestmark = pytest.mark.usefixtures("one_thread")


def planted_sparse(tokens: int = 4000, dim: int = 32, atoms: int = 48, active: int = 3, seed: int = 0):
    """Tokens that are non-negative sparse combinations of random unit atoms, plus a little noise."""
    generator = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(atoms, dim, generator=generator), dim=1)
    index = torch.rand(tokens, atoms, generator=generator).argsort(1)[:, :active]
    coefficients = torch.zeros(tokens, atoms).scatter(1, index, torch.rand(tokens, active, generator=generator) + 0.5)
    return coefficients @ dictionary + 0.01 * torch.randn(tokens, dim, generator=generator), dictionary


def test_sae_reduces_reconstruction_error_on_planted_sparse_data():
    h, dictionary = planted_sparse()
    config = SAEConfig(n_latents=48, k=3, steps=400, batch_size=256, check_every=100, lr=2e-3)
    _, untrained = train_sae(h, SAEConfig(n_latents=48, k=3, steps=1, check_every=1))
    sae, history = train_sae(h, config)
    assert history.steps == 400
    first, last = untrained.fvu[-1][1], history.fvu[-1][1]
    assert last < 0.5 * first, (first, last)
    assert last < 0.35
    # most planted atoms have a decoder column pointing their way
    recovered = (dictionary @ sae.w_dec.detach()).max(1).values
    assert float((recovered > 0.8).float().mean()) > 0.5


def test_sae_encodes_k_sparse_non_negative_latents_with_unit_decoder_columns():
    h, _ = planted_sparse(tokens=600)
    sae, _ = train_sae(h, SAEConfig(n_latents=20, k=4, steps=20, batch_size=128, check_every=10))
    with torch.no_grad():
        z = sae.encode(h[:50])
    assert z.shape == (50, 20)
    assert int((z != 0).sum(1).max()) <= 4
    assert float(z.min()) >= 0.0
    torch.testing.assert_close(sae.w_dec.norm(dim=0), torch.ones(20))
    assert fvu(sae, h) == pytest.approx(fvu(sae, h, batch_size=7), rel=1e-5)


def test_target_fvu_stops_training_early():
    h, _ = planted_sparse(tokens=2000)
    _, history = train_sae(h, SAEConfig(n_latents=48, k=3, steps=2000, batch_size=256, check_every=20,
                                        lr=2e-3, target_fvu=0.6))
    assert history.reached_target and history.steps < 2000


def test_bad_inputs_are_data_errors():
    with pytest.raises(DataError):
        TopKSAE(8, 4, k=5)
    with pytest.raises(DataError):
        train_sae(torch.zeros(5, 8), SAEConfig(n_latents=4, k=2))


def test_collect_hidden_tokens_bounds_memory_and_reads_what_fc2_reads():
    torch.manual_seed(0)
    model = create_embedded_model(pretrained=False)
    layers = find_layers(model, ["blocks.0.mlp"])
    images = torch.randint(0, 255, (12, 32, 32, 3), dtype=torch.uint8).numpy()
    source = ArraySource("random", 12, images=images)
    tokens = collect_hidden_tokens(model, layers, source, embedded_input_spec(), max_tokens=300, batch_size=5)
    rows = tokens["blocks.0.mlp"]
    assert rows.shape[1] == 384 and 150 <= rows.shape[0] <= 300  # ~300 of 12 * 65 tokens kept
    everything = collect_hidden_tokens(model, layers, source, embedded_input_spec(), max_tokens=10**6)
    assert everything["blocks.0.mlp"].shape == (12 * 65, 384)
