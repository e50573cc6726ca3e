"""Tests of flowplugins.preprocessing."""

from __future__ import annotations

import math

import pytest
import torch

from flowplugins.bijectors.logit import LogitTransform
from flowplugins.preprocessing import bits_per_dim, dequantize, quantize, reduce_bits

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def levels(*shape, n_bits=8, seed=0, dtype=torch.uint8):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**n_bits, shape, generator=g).to(dtype)


@pytest.mark.parametrize("n_bits", [1, 5, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dequantize_stays_in_its_bin_and_quantize_inverts_it(n_bits, dtype):
    k = levels(4, 3, 8, 8, n_bits=n_bits)
    y = dequantize(k, n_bits=n_bits, dtype=dtype, generator=torch.Generator().manual_seed(1))
    assert y.dtype == dtype and y.shape == k.shape
    kk = k.to(torch.float64)
    assert (y >= kk / 2**n_bits).all() and (y < (kk + 1) / 2**n_bits).all()
    assert (y >= 0).all() and (y < 1).all()
    assert torch.equal(quantize(y, n_bits), k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_noise_next_to_one_cannot_round_up_into_the_next_bin(monkeypatch, dtype):
    """float32(255 + 0.99999994) == 256: the clamp keeps it in bin 255 and below 1."""
    k = torch.tensor([0, 1, 100, 254, 255], dtype=torch.uint8)
    just_below_one = torch.nextafter(torch.ones((), dtype=dtype), torch.zeros((), dtype=dtype))
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: just_below_one.expand(shape).clone())
    y = dequantize(k, dtype=dtype)
    assert (y < 1).all()
    assert torch.equal(quantize(y), k)


def test_dequantize_is_uniform_within_the_bin():
    k = torch.full((20000,), 3, dtype=torch.uint8)
    u = dequantize(k, n_bits=2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 4 - 3
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005


def test_dequantize_generator_makes_it_reproducible():
    k = levels(2, 3, 4, 4)
    a = dequantize(k, generator=torch.Generator().manual_seed(5))
    b = dequantize(k, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_dequantize_accepts_wide_integer_types_and_defaults_to_default_dtype():
    y = dequantize(torch.tensor([[0, 1023]], dtype=torch.int64), n_bits=10)
    assert y.dtype == torch.get_default_dtype() and (y < 1).all()
    assert torch.equal(quantize(y, 10), torch.tensor([[0, 1023]], dtype=torch.int32))


def test_dequantize_empty_tensor():
    assert dequantize(torch.zeros(0, dtype=torch.uint8)).shape == (0,)


def test_dequantize_rejects_floats():
    with pytest.raises(TypeError, match=r"dequantize: expected an integer tensor of levels 0\.\.255; got dtype torch\.float32"):
        dequantize(torch.rand(3))


@pytest.mark.parametrize("bad, n_bits", [(torch.tensor([0, 32]), 5), (torch.tensor([-1, 3]), 8)])
def test_dequantize_rejects_out_of_range_levels(bad, n_bits):
    with pytest.raises(ValueError, match=rf"dequantize: levels must lie in \[0, {2 ** n_bits - 1}\] for n_bits={n_bits}; got values in"):
        dequantize(bad, n_bits=n_bits)


@pytest.mark.parametrize("n_bits", [0, 17, 2.0, True])
def test_invalid_n_bits_is_rejected(n_bits):
    with pytest.raises(ValueError, match=r"dequantize: n_bits must be an integer in \[1, 16\]"):
        dequantize(torch.tensor([0]), n_bits=n_bits)


def test_dequantize_rejects_integer_dtype():
    with pytest.raises(TypeError, match="dequantize: dtype must be a floating dtype"):
        dequantize(torch.tensor([0]), dtype=torch.int64)


def test_quantize_clamps_and_returns_image_dtypes():
    x = torch.tensor([-0.2, 0.0, 0.5, 0.999, 1.0, 1.3])
    assert quantize(x).tolist() == [0, 0, 128, 255, 255, 255]
    assert quantize(x).dtype == torch.uint8
    assert quantize(x, 5).tolist() == [0, 0, 16, 31, 31, 31]
    assert quantize(x, 12).dtype == torch.int32


def test_quantize_rejects_non_finite_and_integer_input():
    with pytest.raises(ValueError, match="quantize: input contains NaN or inf"):
        quantize(torch.tensor([0.5, float("nan")]))
    with pytest.raises(TypeError, match="quantize: expected a floating tensor"):
        quantize(torch.tensor([1, 2]))


def test_reduce_bits_matches_glow():
    k = torch.arange(256, dtype=torch.int64)
    out = reduce_bits(k, 5)
    assert torch.equal(out, k // 8) and out.dtype == torch.int64
    assert out.max().item() == 31
    assert reduce_bits(k.to(torch.uint8), 8).dtype == torch.uint8
    assert torch.equal(reduce_bits(k.to(torch.uint8), 8), k.to(torch.uint8))
    assert torch.equal(reduce_bits(torch.tensor([0, 31]), 3, from_bits=5), torch.tensor([0, 7]))


def test_reduce_bits_errors():
    with pytest.raises(ValueError, match="reduce_bits: n_bits must not exceed from_bits=8; got n_bits=9"):
        reduce_bits(torch.tensor([0]), 9)
    with pytest.raises(ValueError, match=r"reduce_bits: levels must lie in \[0, 31\]"):
        reduce_bits(torch.tensor([40]), 3, from_bits=5)
    with pytest.raises(TypeError, match="reduce_bits: expected an integer tensor"):
        reduce_bits(torch.rand(2), 5)


def test_bits_per_dim_formula():
    d = 3 * 8 * 8
    log_prob = torch.tensor([-1000.0, 0.0, 500.0], dtype=torch.float64)
    expected = (-log_prob + d * 8 * math.log(2)) / (d * math.log(2))
    torch.testing.assert_close(bits_per_dim(log_prob, d), expected)
    assert bits_per_dim(0.0, d, n_bits=5) == pytest.approx(5.0)


def test_uniform_model_has_exactly_n_bits_per_dim():
    """The uniform density on [0, 1)^D is the discrete uniform model: log2(2^n) bits per dim."""
    k = levels(16, 1, 4, 4, n_bits=5)
    x = dequantize(k, n_bits=5, dtype=torch.float64)
    log_prob = torch.zeros(x.shape[0], dtype=torch.float64)  # log 1 everywhere in [0, 1)^D
    torch.testing.assert_close(bits_per_dim(log_prob, 16, n_bits=5), torch.full((16,), 5.0, dtype=torch.float64))


def test_bits_per_dim_through_a_logit_preprocessing_layer():
    """log p(x) = log N(logit(x)) + logit log-det is the [0,1) density that bits_per_dim needs."""
    layer = LogitTransform((1, 2, 2), alpha=0.05)
    x = dequantize(levels(8, 1, 2, 2), dtype=torch.float64)
    y, ld = layer(x)
    log_prob = torch.distributions.Normal(0.0, 1.0).log_prob(y).sum(dim=(1, 2, 3)) + ld
    bpd = bits_per_dim(log_prob, 4)
    manual = (-log_prob / 4 + 8 * math.log(2)) / math.log(2)
    torch.testing.assert_close(bpd, manual)
    assert torch.isfinite(bpd).all()


@pytest.mark.parametrize("num_dims", [0, -3, 2.5, True])
def test_bits_per_dim_rejects_bad_num_dims(num_dims):
    with pytest.raises(ValueError, match="bits_per_dim: num_dims must be a positive integer"):
        bits_per_dim(torch.zeros(2), num_dims)


@cuda
def test_cuda():
    k = levels(2, 3, 4, 4).cuda()
    y = dequantize(k, generator=torch.Generator(device="cuda").manual_seed(0))
    assert y.is_cuda and torch.equal(quantize(y), k)
