"""Simulated quantization numerics on real tensors: grids, scales, groups, and the SQNR they cost."""

from __future__ import annotations

import math

import pytest
import torch

from rayq.host.fake_quant import (
    FORMATS,
    Format,
    NoiseMeter,
    bits_per_element,
    fake_quantize,
    get_format,
    round_to_float,
    sqnr_db,
)

FP4_GRID = {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _fp8_probe(dtype: torch.dtype, max_value: float) -> torch.Tensor:
    """Every finite fp8 value, every midpoint between neighbours (the ties), and random values."""
    codes = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    grid = torch.unique(codes[torch.isfinite(codes)])
    mids = (grid[1:] + grid[:-1]) / 2  # exact in float32: ties, the subnormal ones included
    nudged = torch.cat([mids * (1 + 2**-20), mids * (1 - 2**-20)])
    mags = torch.randn(20_000, generator=_gen(1)) * torch.exp2(torch.randint(-24, 16, (20_000,), generator=_gen(2)))
    probe = torch.cat([grid, mids, nudged, mags, torch.tensor([0.0, -0.0, max_value, -max_value])])
    return probe[probe.abs() <= max_value]


@pytest.mark.parametrize(
    ("dtype", "exp_bits", "man_bits", "max_value"),
    [(torch.float8_e4m3fn, 4, 3, 448.0), (torch.float8_e5m2, 5, 2, 57344.0)],
)
def test_fp8_rounding_equals_torch_casts(dtype: torch.dtype, exp_bits: int, man_bits: int, max_value: float) -> None:
    y = _fp8_probe(dtype, max_value)
    ours = round_to_float(y, exp_bits, man_bits, max_value)
    theirs = y.to(dtype).float()
    bad = ours != theirs
    assert not bad.any(), f"{int(bad.sum())} differ, e.g. {y[bad][:5].tolist()} -> {ours[bad][:5].tolist()}"


def test_minifloats_saturate_at_their_max() -> None:
    y = torch.tensor([1e9, -1e9, 7.0, 100.0])
    assert round_to_float(y, 2, 1, 6.0).tolist() == [6.0, -6.0, 6.0, 6.0]
    assert round_to_float(y, 5, 2, 57344.0)[:2].tolist() == [57344.0, -57344.0]


def test_fp4_elements_are_exactly_the_e2m1_values() -> None:
    x = torch.randn(64, 256, generator=_gen())
    x[:32, ::32] = 3 * torch.exp2(torch.randint(-6, 6, (32, 8), generator=_gen(1)).float())  # scale 2**k/2: exact
    y = fake_quantize(x, "fp4", group_size=32).reshape(64, 8, 32)
    scale = x.reshape(64, 8, 32).abs().amax(-1, keepdim=True) / 6
    elems = (y / scale).abs()
    assert set(elems[:32].unique().tolist()) == FP4_GRID  # exact where the scale is a power of two
    grid = torch.tensor(sorted(FP4_GRID))
    nearest = grid[(elems[..., None] - grid).abs().argmin(-1)]
    assert torch.allclose(elems, nearest, rtol=1e-6, atol=0)  # else within float32 rounding of the scale
    assert set(nearest.unique().tolist()) == FP4_GRID  # Gaussian data uses every level


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("sym", [None, True])
def test_int_levels_and_error_bound(bits: int, sym: bool | None) -> None:
    x = torch.randn(16, 512, generator=_gen(bits)) * 3
    g = 64
    y = fake_quantize(x, f"int{bits}", group_size=g, sym=sym).reshape(16, -1, g)
    xg = x.reshape(16, -1, g)
    if sym:
        scale = xg.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    else:
        scale = (xg.amax(-1, keepdim=True) - xg.amin(-1, keepdim=True)) / (2**bits - 1)
    assert torch.all((y - xg).abs() <= scale / 2 * (1 + 1e-5) + 1e-7)
    distinct = max(len(row.unique()) for row in y.reshape(-1, g))
    assert distinct <= 2**bits
    if sym:
        assert distinct <= 2**bits - 1  # a symmetric grid never reaches -2**(b-1)


def test_asymmetric_fits_one_signed_data_that_symmetric_wastes_half_its_levels_on() -> None:
    x = torch.rand(32, 256, generator=_gen())  # post-ReLU-like: all in [0, 1)
    asym = fake_quantize(x, "int4")
    sym = fake_quantize(x, "int4", sym=True)
    assert sqnr_db(x, asym) > sqnr_db(x, sym) + 5
    assert max(len(r.unique()) for r in asym) == 16 and max(len(r.unique()) for r in sym) <= 8
    # the zero point is not clamped to 4 bits: a group far from zero still gets all 16 levels
    far = x + 10
    err = (fake_quantize(far, "int4") - far).abs().amax(-1)
    assert torch.all(err <= (far.amax(-1) - far.amin(-1)) / 15 / 2 * (1 + 1e-4))
    # asymmetric grid: consecutive distinct values one scale apart, zero exactly representable
    row = asym[0].unique()
    steps = row.diff()
    assert torch.allclose(steps, steps[0].expand_as(steps), rtol=1e-4)
    # symmetric grid is mirrored: -v is on it whenever v is
    z = torch.randn(4, 128, generator=_gen(3))
    ys = fake_quantize(z, "int4", sym=True)
    assert torch.equal(fake_quantize(-z, "int4", sym=True), -ys)


def test_sqnr_gains_about_six_db_per_bit_and_groups_tame_outliers() -> None:
    x = torch.randn(256, 1024, generator=_gen())
    db = {b: sqnr_db(x, fake_quantize(x, f"int{b}", sym=True)) for b in (4, 5, 6, 7, 8)}
    assert db[8] - db[4] > 20
    for b in (4, 5, 6, 7):
        assert 4.5 < db[b + 1] - db[b] < 7.5, db
    outliers = x.clone()
    outliers[:, ::97] *= 40  # a few huge channels, as LLM activations have
    per_row = sqnr_db(outliers, fake_quantize(outliers, "int4", sym=True))
    grouped = sqnr_db(outliers, fake_quantize(outliers, "int4", group_size=32, sym=True))
    assert grouped > per_row + 3


@pytest.mark.parametrize(
    ("fmt", "group_size", "sym"),
    [
        ("int4", None, True),
        ("int8", 128, True),
        ("int2", 32, True),
        ("fp4", 32, None),
        ("fp6", None, None),
        ("fp6e2m3", 64, None),
        ("fp8", 128, None),
        ("fp8e5m2", None, None),
        *[(name, None, None) for name, f in FORMATS.items() if f.kind == "mx"],
    ],
)
def test_quantizing_twice_changes_nothing(fmt: str, group_size: int | None, sym: bool | None) -> None:
    x = torch.randn(64, 576, generator=_gen()) * torch.exp2(torch.randint(-8, 8, (64, 1), generator=_gen(1)))
    once = fake_quantize(x, fmt, group_size, sym)
    assert torch.equal(fake_quantize(once, fmt, group_size, sym), once)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_asymmetric_int_is_idempotent_to_float32_rounding(bits: int) -> None:
    x = torch.randn(64, 576, generator=_gen())
    once = fake_quantize(x, f"int{bits}", 64)
    twice = fake_quantize(once, f"int{bits}", 64)
    torch.testing.assert_close(twice, once, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", [n for n, f in FORMATS.items() if f.kind == "mx"])
def test_mx_blocks_share_one_power_of_two(name: str) -> None:
    fmt = get_format(name)
    magnitudes = torch.exp2(torch.randint(-10, 10, (8, 8, 1), generator=_gen(2)).float())  # one per block
    x = (torch.randn(8, 8, 32, generator=_gen()) * magnitudes).reshape(8, 256)
    y = fake_quantize(x, name).reshape(8, 8, 32)
    xb = x.reshape(8, 8, 32)
    emax = math.floor(math.log2(fmt.max_value))
    scale = torch.exp2(torch.floor(torch.log2(xb.abs().amax(-1, keepdim=True))) - emax)
    elems = y / scale
    if fmt.exp_bits == 0:  # mxint8: k * 2**-6, k in [-127, 127]
        k = elems * 64
        assert torch.equal(k, k.round()) and k.abs().max() <= 127
    else:
        assert torch.equal(round_to_float(elems, fmt.exp_bits, fmt.man_bits, fmt.max_value), elems)
    # the ratio to the element value is the block's power of two for every nonzero element
    nz = y != 0
    ratio = (y / elems)[nz]
    assert torch.equal(ratio, scale.expand_as(y)[nz])
    assert torch.equal(torch.frexp(ratio)[0], torch.full_like(ratio, 0.5))


def test_mxfp4_elements_are_e2m1_values() -> None:
    x = torch.randn(4, 128, generator=_gen())
    y = fake_quantize(x, "mxfp4").reshape(4, 4, 32)
    scale = torch.exp2(torch.floor(torch.log2(x.reshape(4, 4, 32).abs().amax(-1, keepdim=True))) - 2)
    assert set((y / scale).abs().unique().tolist()) <= FP4_GRID


def test_mx_shared_exponent_is_clamped_to_e8m0() -> None:
    x = torch.full((1, 32), 2.0**-140)
    y = fake_quantize(x, "mxfp8")  # scale 2**-127, element 2**-13 is below e4m3's smallest subnormal
    assert torch.all(torch.isfinite(y)) and torch.all(y == 0)


def test_ragged_groups_match_quantizing_the_pieces() -> None:
    gaussian = torch.randn(8, 576, generator=_gen())
    shifted = gaussian.abs() + 1  # one-signed: padding with zeros instead would widen the last group
    for x, fmt, sym in [
        (shifted, "int4", None),
        (gaussian, "int4", None),
        (gaussian, "int3", True),
        (gaussian, "fp4", None),
    ]:
        whole = fake_quantize(x, fmt, group_size=128, sym=sym)
        pieces = torch.cat([fake_quantize(p, fmt, sym=sym) for p in x.split(128, dim=-1)], dim=-1)
        assert torch.equal(whole, pieces), fmt
    ragged_mx = torch.randn(3, 80, generator=_gen(1))
    pieces = torch.cat([fake_quantize(p, "mxfp6", sym=None) for p in ragged_mx.split(32, dim=-1)], dim=-1)
    assert torch.equal(fake_quantize(ragged_mx, "mxfp6"), pieces)


def test_per_row_scale_follows_the_last_dim_of_any_shape() -> None:
    kv = torch.randn(2, 4, 16, 64, generator=_gen())
    y = fake_quantize(kv, "int4", sym=True)
    assert y.shape == kv.shape
    for b, h, s in [(0, 0, 0), (1, 3, 15), (1, 2, 7)]:
        assert torch.equal(y[b, h, s], fake_quantize(kv[b, h, s], "int4", sym=True))


@pytest.mark.parametrize("fmt", ["int4", "int8", "fp4", "fp8", "mxfp4", "mxint8"])
def test_zero_rows_stay_zero_and_dtype_is_kept(fmt: str) -> None:
    x = torch.randn(4, 96, generator=_gen())
    x[1] = 0
    y = fake_quantize(x, fmt, group_size=None if fmt.startswith("mx") else 32)
    assert torch.all(y[1] == 0) and torch.all(torch.isfinite(y))
    xb = x.to(torch.bfloat16)
    yb = fake_quantize(xb, fmt)
    assert yb.dtype == torch.bfloat16 and yb.shape == xb.shape
    assert sqnr_db(xb.float(), yb.float()) > 10


def test_constant_group_comes_back_unchanged() -> None:
    x = torch.full((2, 64), 3.25)
    assert torch.equal(fake_quantize(x, "int4"), x)


def test_bits_per_element() -> None:
    assert bits_per_element("int4", 128, 4096) == pytest.approx(4 + (16 + 4) / 128)
    assert bits_per_element("mxfp4", None, 4096) == pytest.approx(4.25)
    assert bits_per_element("mxint8", 32, 4096) == pytest.approx(8.25)
    assert bits_per_element("int8", None, 1024, sym=True) == pytest.approx(8 + 16 / 1024)
    assert bits_per_element("fp8", 32, 4096) == pytest.approx(8.5)
    assert bits_per_element("int4", 128, 576, sym=True) == pytest.approx(4 + 16 * 5 / 576)  # ragged pays a scale


def test_bad_names_and_options_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match=r"unknown quantization format 'int9'.*int4.*mxfp4"):
        get_format("int9")
    with pytest.raises(ValueError, match="'nf4'"):
        fake_quantize(torch.ones(4, 4), "nf4")
    with pytest.raises(ValueError, match=r"fp8 is a float format.*sym=False"):
        fake_quantize(torch.ones(4, 4), "fp8", sym=False)
    with pytest.raises(ValueError, match="sym=False"):
        bits_per_element("mxfp4", None, 64, sym=False)
    with pytest.raises(ValueError, match="block of 32; group_size=64"):
        fake_quantize(torch.ones(4, 64), "mxfp4", group_size=64)
    with pytest.raises(ValueError, match="group_size must be at least 1"):
        fake_quantize(torch.ones(4, 64), "int4", group_size=0)


def test_format_table() -> None:
    assert get_format("fp8") == Format("fp8", "float", 8, 4, 3, 448.0)
    assert get_format("mxfp6e2m3").block == 32 and get_format("mxfp6e2m3").max_value == 7.5
    assert [get_format(f"int{b}").bits for b in range(2, 9)] == list(range(2, 9))
    assert fake_quantize(torch.ones(2, 8), get_format("int8"), sym=True).dtype == torch.float32


def test_sqnr_and_noise_meter() -> None:
    x = torch.randn(1000, generator=_gen())
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(x, x * 1.1) == pytest.approx(20.0, abs=1e-4)  # noise 0.01 of signal
    meter = NoiseMeter()
    assert meter.db() is None
    a, b = torch.randn(100, generator=_gen(1)), torch.randn(300, generator=_gen(2)) * 10
    qa, qb = fake_quantize(a[None], "int4")[0], fake_quantize(b[None], "int4")[0]
    meter.add(a, qa)
    meter.add(b, qb)
    assert meter.db() == pytest.approx(sqnr_db(torch.cat([a, b]), torch.cat([qa, qb])), rel=1e-9)
