"""The PyTorch twins of NCSN++ (score_sde) and ADM (guided-diffusion) used by importer parity tests.

No JAX here: construction is deterministic, the state-dict layout of the FULL configs is the
published checkpoints' (names and shapes checked on the ``meta`` device, so no 100M/550M
parameter model is allocated), parameter counts agree with a closed-form count and with the
reference code's, the forward passes have the right shapes and per-example independence, and the
time embeddings have their closed forms.
"""

import importlib
import math

import pytest

pytestmark = pytest.mark.torch

# Parameter counts of the FULL configs, read off the reference code itself (score_sde's
# models/ncsnpp.NCSNpp with configs/vp/cifar10_ddpmpp_deep_continuous.py, guided-diffusion's
# script_util.create_model with DiffPure's configs/imagenet.yml), instantiated once while writing
# the twins. ADM 256 uncond is the "552M" model of Dhariwal & Nichol's LSUN/ImageNet-uncond
# architecture (the class-conditional one adds a 1000 x 1024 label embedding: 554M).
NCSN_FULL_PARAMS = 106_632_579
ADM_FULL_PARAMS = 552_814_086


# The twins import torch at module level: import them in fixtures, after the torch marker has
# had its say (skip without torch, or fail under JAXROB_REQUIRE_MARKERS=torch).
@pytest.fixture(scope="module")
def torch():
    return importlib.import_module("torch")


@pytest.fixture(scope="module")
def ncsn(torch):
    return importlib.import_module("_twin_ncsnpp")


@pytest.fixture(scope="module")
def adm(torch):
    return importlib.import_module("_twin_adm")


@pytest.fixture(scope="module")
def ncsn_small(ncsn):
    return ncsn.build_ncsnpp(ncsn.SMALL_CONFIG)


@pytest.fixture(scope="module")
def adm_small(adm):
    return adm.build_adm(adm.SMALL_CONFIG)


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------- closed-form parameter counts


def _gn(c):
    return 2 * c


def _conv(a, b, k):
    return k * k * a * b + b


def _ncsnpp_count(cfg) -> int:
    """Count NCSN++ (BigGAN blocks) parameters from the architecture description alone."""
    nf, mult, nb = cfg["nf"], cfg["ch_mult"], cfg["num_res_blocks"]
    res = [cfg["image_size"] // 2**i for i in range(len(mult))]
    temb = 4 * nf

    def block(a, b=None, resample=False):
        b = b or a
        shortcut = _conv(a, b, 1) if (a != b or resample) else 0
        return _gn(a) + _conv(a, b, 3) + (temb * b + b) + _gn(b) + _conv(b, b, 3) + shortcut

    def attn(c):
        return _gn(c) + 4 * (c * c + c)  # NIN_0..3

    n = (nf * temb + temb) + (temb * temb + temb) + _conv(3, nf, 3)
    ch, skips = nf, [nf]
    for lvl, m in enumerate(mult):
        for _ in range(nb):
            n += block(ch, nf * m) + (attn(nf * m) if res[lvl] in cfg["attn_resolutions"] else 0)
            ch = nf * m
            skips.append(ch)
        if lvl != len(mult) - 1:
            n += block(ch, resample=True)
            skips.append(ch)
    n += 2 * block(ch) + attn(ch)
    for lvl in reversed(range(len(mult))):
        for _ in range(nb + 1):
            n += block(ch + skips.pop(), nf * mult[lvl])
            ch = nf * mult[lvl]
        n += attn(ch) if res[lvl] in cfg["attn_resolutions"] else 0
        n += block(ch, resample=True) if lvl else 0
    return n + _gn(ch) + _conv(ch, 3, 3)


def _adm_count(C, mult, nb, attn_rates, out_ch) -> int:
    """Count ADM UNet parameters (scale-shift norm, residual up/down) from its description."""
    E = 4 * C

    def res(a, b=None):
        b = b or a
        skip = _conv(a, b, 1) if a != b else 0
        return _gn(a) + _conv(a, b, 3) + (E * 2 * b + 2 * b) + _gn(b) + _conv(b, b, 3) + skip

    def attn(c):
        return _gn(c) + (c * 3 * c + 3 * c) + (c * c + c)

    n = (C * E + E) + (E * E + E) + _conv(3, C * mult[0], 3)
    ch, skips, rate = C * mult[0], [C * mult[0]], 1
    for lvl, m in enumerate(mult):
        for _ in range(nb):
            n += res(ch, C * m) + (attn(C * m) if rate in attn_rates else 0)
            ch = C * m
            skips.append(ch)
        if lvl != len(mult) - 1:
            n += res(ch)
            skips.append(ch)
            rate *= 2
    n += 2 * res(ch) + attn(ch)
    for lvl in reversed(range(len(mult))):
        for i in range(nb + 1):
            n += res(ch + skips.pop(), C * mult[lvl])
            ch = C * mult[lvl]
            n += attn(ch) if rate in attn_rates else 0
            if lvl and i == nb:
                n += res(ch)
                rate //= 2
    return n + _gn(ch) + _conv(ch, out_ch, 3)


# ------------------------------------------------------------------------------------ NCSN++


def test_ncsnpp_full_layout_matches_the_score_sde_checkpoint(torch, ncsn):
    model = ncsn.build_ncsnpp(ncsn.FULL_CONFIG, device="meta")
    sd = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    # positional embedding: all_modules.0 is the first Dense of the time MLP (no Fourier "W").
    assert "all_modules.0.W" not in shapes
    expected = {
        "sigmas": (1000,),
        "all_modules.0.weight": (512, 128), "all_modules.0.bias": (512,),
        "all_modules.1.weight": (512, 512),
        "all_modules.2.weight": (128, 3, 3, 3), "all_modules.2.bias": (128,),
        "all_modules.3.GroupNorm_0.weight": (128,),
        "all_modules.3.Conv_0.weight": (128, 128, 3, 3),
        "all_modules.3.Dense_0.weight": (128, 512),
        "all_modules.3.GroupNorm_1.bias": (128,),
        "all_modules.3.Conv_1.weight": (128, 128, 3, 3),
        # level 0 (32x32): modules 3..10, then the BigGAN down block (1x1 shortcut Conv_2)
        "all_modules.11.Conv_2.weight": (128, 128, 1, 1),
        # level 1 (16x16) starts with a 128 -> 256 block followed by attention
        "all_modules.12.Conv_2.weight": (256, 128, 1, 1),
        "all_modules.13.GroupNorm_0.weight": (256,),
        "all_modules.13.NIN_0.W": (256, 256), "all_modules.13.NIN_3.b": (256,),
    }
    for k, shape in expected.items():
        assert shapes.get(k) == shape, (k, shapes.get(k), shape)
    assert "all_modules.3.Conv_2.weight" not in shapes  # 128 -> 128, no resampling
    assert sd["sigmas"].dtype == torch.float64
    n_mod = len(model.all_modules)
    assert shapes[f"all_modules.{n_mod - 2}.weight"] == (128,)  # final GroupNorm
    assert shapes[f"all_modules.{n_mod - 1}.weight"] == (3, 128, 3, 3)  # output conv
    # 2 dense + conv + 4 levels x (8 blocks) + 8 attn + 3 down + 3 mid + 4 x 9 up blocks
    # + 2 up-level attn + 3 up + norm + conv
    assert n_mod == 2 + 1 + 32 + 8 + 3 + 3 + 36 + 1 + 3 + 2
    assert all(k == "sigmas" or k.startswith("all_modules.") for k in shapes)


def test_ncsnpp_parameter_count(torch, ncsn):
    full = ncsn.build_ncsnpp(ncsn.FULL_CONFIG, device="meta")
    assert _n_params(full) == _ncsnpp_count(ncsn.FULL_CONFIG) == NCSN_FULL_PARAMS
    small = ncsn.build_ncsnpp(ncsn.SMALL_CONFIG, device="meta")
    assert _n_params(small) == _ncsnpp_count(ncsn.SMALL_CONFIG)
    # The 4-block DDPM++ continuous config (not DiffPure's) is the ~62M model.
    four = {**ncsn.FULL_CONFIG, "num_res_blocks": 4}
    assert _n_params(ncsn.build_ncsnpp(four, device="meta")) == _ncsnpp_count(four)
    assert 61e6 < _ncsnpp_count(four) < 63e6


def test_ncsnpp_fourier_embedding_has_w(torch, ncsn):
    shapes = {k: tuple(v.shape) for k, v in
              ncsn.build_ncsnpp({**ncsn.SMALL_CONFIG, "embedding_type": "fourier"}, device="meta")
              .state_dict().items()}
    assert shapes["all_modules.0.W"] == (16,)
    assert shapes["all_modules.1.weight"] == (64, 32)  # Dense from 2 nf Fourier features


def test_ncsnpp_deterministic_from_seed(torch, ncsn, ncsn_small):
    again = ncsn.build_ncsnpp(ncsn.SMALL_CONFIG)
    other = ncsn.build_ncsnpp({**ncsn.SMALL_CONFIG, "seed": 1})
    a, b, c = ncsn_small.state_dict(), again.state_dict(), other.state_dict()
    assert list(a) == list(b) == list(c)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["all_modules.3.Conv_1.weight"], c["all_modules.3.Conv_1.weight"])
    # no degenerate (all-zero) tensor: every branch matters in a parity test
    assert all(v.abs().max() > 0 for k, v in a.items() if k != "sigmas")


def test_ncsnpp_forward_shape_and_per_example(torch, ncsn, ncsn_small):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 16, 16, generator=g)
    t = torch.tensor([0.0, 412.5, 999.0])
    with torch.no_grad():
        out = ncsn_small(x, t)
        first = ncsn_small(x[:1], t[:1])
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.std() > 0.1
    torch.testing.assert_close(out[:1], first, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the time input matters
        assert (ncsn_small(x, t.flip(0)) - out).abs().max() > 1e-3


def test_ncsnpp_time_embedding_closed_form(torch, ncsn):
    t = torch.tensor([0.0, 3.0])
    emb = ncsn.sinusoidal_embedding(t, 16)
    assert emb.shape == (2, 16)
    torch.testing.assert_close(emb[0], torch.cat([torch.zeros(8), torch.ones(8)]))
    # k-th frequency is 10000^(-k / (half - 1)): k = 0 -> 1, k = 7 -> 1e-4
    assert math.isclose(emb[1, 0].item(), math.sin(3.0), rel_tol=1e-6)
    assert math.isclose(emb[1, 7].item(), math.sin(3.0 * 1e-4), rel_tol=1e-4)
    assert math.isclose(emb[1, 15].item(), math.cos(3.0 * 1e-4), rel_tol=1e-6)


def test_ncsnpp_loads_a_data_parallel_checkpoint_and_ema(torch, ncsn, ncsn_small):
    donor = ncsn.build_ncsnpp({**ncsn.SMALL_CONFIG, "seed": 3})
    target = ncsn.build_ncsnpp({**ncsn.SMALL_CONFIG, "seed": 4})
    ckpt = {"module." + k: v.clone() for k, v in ncsn_small.state_dict().items()}
    target.load_state_dict(ncsn.strip_data_parallel(ckpt), strict=True)
    for k, v in ncsn_small.state_dict().items():
        assert torch.equal(target.state_dict()[k], v)
    ncsn.copy_ema(target, [p.detach().clone() for p in donor.parameters()])
    for (k, p), q in zip(target.named_parameters(), donor.parameters(), strict=True):
        assert torch.equal(p, q), k


def test_ncsnpp_unsupported_options_raise(torch, ncsn):
    for bad in ({"fir": True}, {"resblock_type": "ddpm"}, {"progressive": "output_skip"},
                {"progressive_input": "residual"}, {"normalization": "InstanceNorm"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ncsn.build_ncsnpp({**ncsn.SMALL_CONFIG, **bad}, device="meta")
    with pytest.raises(ValueError, match="missing keys"):
        ncsn.build_ncsnpp({"nf": 16})


# --------------------------------------------------------------------------------------- ADM


def test_adm_full_layout_matches_the_guided_diffusion_checkpoint(torch, adm):
    model = adm.build_adm(adm.FULL_CONFIG, device="meta")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "time_embed.0.weight": (1024, 256), "time_embed.2.weight": (1024, 1024),
        "input_blocks.0.0.weight": (256, 3, 3, 3),
        "input_blocks.1.0.in_layers.0.weight": (256,),
        "input_blocks.1.0.in_layers.2.weight": (256, 256, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (512, 1024),  # scale and shift
        "input_blocks.1.0.out_layers.0.weight": (256,),
        "input_blocks.1.0.out_layers.3.weight": (256, 256, 3, 3),
        # level 2 (64x64) widens 256 -> 512 with a 1x1 skip; level 3 (32x32) has attention
        "input_blocks.7.0.skip_connection.weight": (512, 256, 1, 1),
        "input_blocks.10.1.norm.weight": (512,),
        "input_blocks.10.1.qkv.weight": (1536, 512, 1),
        "input_blocks.10.1.proj_out.weight": (512, 512, 1),
        "input_blocks.17.1.qkv.weight": (3072, 1024, 1),
        "middle_block.1.qkv.weight": (3072, 1024, 1),
        "middle_block.2.out_layers.3.weight": (1024, 1024, 3, 3),
        "output_blocks.0.0.in_layers.0.weight": (2048,),
        "output_blocks.0.0.skip_connection.weight": (1024, 2048, 1, 1),
        # the last block of the 8x8 level: ResBlock, attention, up-ResBlock
        "output_blocks.2.2.in_layers.2.weight": (1024, 1024, 3, 3),
        "output_blocks.17.0.in_layers.0.weight": (512,),
        "out.0.weight": (256,),
        "out.2.weight": (6, 256, 3, 3), "out.2.bias": (6,),
    }
    for k, shape in expected.items():
        assert shapes.get(k) == shape, (k, shapes.get(k), shape)
    assert len(model.input_blocks) == 18 and len(model.output_blocks) == 18
    assert "input_blocks.3.0.skip_connection.weight" not in shapes  # down block, 256 -> 256
    assert not any(k.startswith("label_emb") for k in shapes)


def test_adm_parameter_count(torch, adm):
    full = adm.build_adm(adm.FULL_CONFIG, device="meta")
    assert _n_params(full) == _adm_count(256, (1, 1, 2, 2, 4, 4), 2, (8, 16, 32), 6)
    assert _n_params(full) == ADM_FULL_PARAMS
    small = adm.build_adm(adm.SMALL_CONFIG, device="meta")
    assert _n_params(small) == _adm_count(32, (1, 2), 1, (2,), 6)


def test_adm_deterministic_from_seed(torch, adm, adm_small):
    again = adm.build_adm(adm.SMALL_CONFIG)
    a, b = adm_small.state_dict(), again.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    c = adm.build_adm({**adm.SMALL_CONFIG, "seed": 1}).state_dict()
    assert not torch.equal(a["out.2.weight"], c["out.2.weight"])
    assert all(v.abs().max() > 0 for v in a.values())


def test_adm_forward_shape_and_per_example(torch, adm, adm_small):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 16, 16, generator=g)
    t = torch.tensor([0, 500, 999])
    with torch.no_grad():
        out = adm_small(x, t)
        last = adm_small(x[2:], t[2:])
        out_float_t = adm_small(x, t.float())
    assert out.shape == (3, 6, 16, 16) and torch.isfinite(out).all() and out.std() > 0.1
    torch.testing.assert_close(out[2:], last, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, out_float_t)  # integer and float steps embed alike


def test_adm_time_embedding_closed_form(torch, adm):
    emb = adm.timestep_embedding(torch.tensor([0.0, 2.0]), 8)
    torch.testing.assert_close(emb[0], torch.cat([torch.ones(4), torch.zeros(4)]))
    # f_k = 10000^(-k/4): cos first, then sin
    for k in range(4):
        f = 10000.0 ** (-k / 4)
        assert math.isclose(emb[1, k].item(), math.cos(2.0 * f), rel_tol=1e-5, abs_tol=1e-6)
        assert math.isclose(emb[1, 4 + k].item(), math.sin(2.0 * f), rel_tol=1e-5, abs_tol=1e-6)


def test_adm_unsupported_options_raise(torch, adm):
    with pytest.raises(ValueError, match="class_cond"):
        adm.build_adm({**adm.SMALL_CONFIG, "class_cond": True}, device="meta")
    with pytest.raises(ValueError, match="use_fp16"):
        adm.build_adm({**adm.SMALL_CONFIG, "use_fp16": True}, device="meta")
    with pytest.raises(ValueError, match="multiple of"):
        adm.build_adm({**adm.SMALL_CONFIG, "num_channels": 24}, device="meta")
