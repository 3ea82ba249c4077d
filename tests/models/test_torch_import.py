"""Weight import from PyTorch: diffusers UNet2DModel, akamaster CIFAR ResNets, RobustBench WRN.

The parity tests compare against PyTorch (``-m torch``; those with diffusers' UNet are marked
``diffusers`` too) and skip without it; the akamaster ``.npz`` tests and the
error tests need only numpy and the shared data directory.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrob.models import (
    UNET_CONFIGS,
    CifarResNet,
    cifar_resnet_from_state_dict,
    load_akamaster_resnet,
    load_state_dict_file,
    unet_config_from_diffusers,
    unet_from_config,
    unet_from_diffusers_state_dict,
    wide_resnet_from_state_dict,
)

# google/ddpm-cifar10-32 config.json (Ho et al. CIFAR-10 model in diffusers).
DDPM_CIFAR10_32 = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    center_input_sample=False,
    time_embedding_type="positional",
    flip_sin_to_cos=False,
    freq_shift=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    mid_block_scale_factor=1,
    downsample_padding=0,
    act_fn="silu",
    attention_head_dim=None,
    norm_num_groups=32,
    norm_eps=1e-6,
)
# The same family, small: attention at the 2nd level (8x8 for 16x16 inputs).
DDPM_SMALL = {
    **DDPM_CIFAR10_32,
    "sample_size": 16,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
}

AKAMASTER = "pretrained_cifar10_resnet_akamaster"


# --------------------------------------------------------------------------- diffusers UNet


def _diffusers_unet(config, seed=0):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(**config).eval()


def _unet_parity(dm, batch, steps, seed=0):
    torch = pytest.importorskip("torch")

    cfg = unet_config_from_diffusers(dm.config)
    variables = unet_from_diffusers_state_dict(dm.state_dict(), cfg)
    model = unet_from_config(cfg)
    size, ch = cfg["image_size"], cfg["in_ch"]
    x = np.random.default_rng(seed).standard_normal((batch, size, size, ch)).astype(np.float32)
    fwd = jax.jit(model.apply)
    for step in steps:
        with torch.no_grad():
            ref = dm(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(step)).sample
        ref = ref.numpy().transpose(0, 2, 3, 1)
        out = np.asarray(fwd(variables, jnp.asarray(x), jnp.asarray(step)))
        assert out.shape == ref.shape
        assert np.abs(ref).max() > 0.1  # a non-trivial output
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)


@pytest.mark.torch
@pytest.mark.diffusers
def test_unet_matches_diffusers_small():
    dm = _diffusers_unet(DDPM_SMALL)
    _unet_parity(
        dm, 3, [np.array([0, 500, 999]), np.array([0.5, 10.25, 999.9], np.float32)]
    )  # fractional labels


@pytest.mark.torch
@pytest.mark.diffusers
@pytest.mark.slow  # about 30 s on the 2-core CPU (35.7M parameters)
def test_unet_matches_diffusers_ddpm_cifar10_32():
    dm = _diffusers_unet(DDPM_CIFAR10_32)
    assert sum(p.numel() for p in dm.parameters()) == 35_746_307
    _unet_parity(dm, 1, [np.array([437])])


def test_ddpm_cifar10_config_translation():
    cfg = unet_config_from_diffusers(DDPM_CIFAR10_32)
    expected = {
        **UNET_CONFIGS["cifar10"],
        "dropout": 0.0,
        "out_ch": 3,
        "attn_head_dim": None,
        "flip_sin_to_cos": False,
        "freq_shift": 1.0,
        "norm_eps": 1e-6,
    }
    assert cfg == expected
    # The UNet defaults are exactly these numerics.
    model = unet_from_config("cifar10")
    assert (model.flip_sin_to_cos, model.freq_shift, model.norm_eps) == (False, 1.0, 1e-6)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"downsample_padding": 1}, "downsample_padding"),
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
        (
            {
                "down_block_types": (
                    "DownBlock2D",
                    "CrossAttnDownBlock2D",
                    "DownBlock2D",
                    "DownBlock2D",
                )
            },
            "CrossAttnDownBlock2D",
        ),
        ({"up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D")}, "mirror"),
        ({"block_out_channels": (128, 192, 256, 256)}, "multiples"),
    ],
)
def test_unsupported_diffusers_configs(change, match):
    with pytest.raises(ValueError, match=match):
        unet_config_from_diffusers({**DDPM_CIFAR10_32, **change})


@pytest.mark.torch
@pytest.mark.diffusers
def test_unet_import_errors_legacy_names_and_files(tmp_path):
    torch = pytest.importorskip("torch")

    dm = _diffusers_unet(DDPM_SMALL)
    sd = {k: v.numpy() for k, v in dm.state_dict().items()}
    cfg = unet_config_from_diffusers(dm.config)
    ref = unet_from_diffusers_state_dict(sd, cfg)

    # Checkpoint files as diffusers writes them (.bin pickle, .safetensors).
    torch.save(dm.state_dict(), tmp_path / "diffusion_pytorch_model.bin")
    dm.save_pretrained(tmp_path / "saved")
    for path in (
        tmp_path / "diffusion_pytorch_model.bin",
        tmp_path / "saved" / "diffusion_pytorch_model.safetensors",
    ):
        got = unet_from_diffusers_state_dict(load_state_dict_file(path), cfg)
        jax.tree_util.tree_map(np.testing.assert_array_equal, got, ref)

    # The deprecated AttentionBlock names of older diffusers checkpoints are accepted.
    legacy = {}
    for k, v in sd.items():
        for new, old in (
            ("to_q", "query"),
            ("to_k", "key"),
            ("to_v", "value"),
            ("to_out.0", "proj_attn"),
        ):
            k = k.replace(f".{new}.", f".{old}.")
        legacy[k] = v
    got = unet_from_diffusers_state_dict(legacy, cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, ref)

    missing = {k: v for k, v in sd.items() if k != "mid_block.attentions.0.to_q.weight"}
    with pytest.raises(ValueError, match=r"missing.*mid_block\.attentions\.0\.to_q\.weight"):
        unet_from_diffusers_state_dict(missing, cfg)
    bad = {**sd, "conv_out.weight": np.zeros((3, 32, 3, 5), np.float32)}
    with pytest.raises(
        ValueError,
        match=r"conv_out\.weight: expected shape \(3, 32, 3, 3\), "
        r"got \(3, 32, 3, 5\)",
    ):
        unet_from_diffusers_state_dict(bad, cfg)
    # A config without attention at 8x8 leaves the attention weights unused.
    with pytest.raises(ValueError, match=r"unexpected key.*down_blocks\.1\.attentions"):
        unet_from_diffusers_state_dict(sd, {**cfg, "attn_resolutions": ()})


# --------------------------------------------------------------------------- akamaster ResNet


def _akamaster_torch(depth):
    """A small PyTorch re-implementation of akamaster's resnet.py (option-A shortcuts)."""
    torch = pytest.importorskip("torch")
    nn, F = torch.nn, torch.nn.functional

    class Block(nn.Module):
        def __init__(self, cin, planes, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.pad = planes // 4 if (stride != 1 or cin != planes) else None

        def forward(self, x):
            out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            if self.pad is None:
                short = x
            else:
                short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
            return F.relu(out + short)

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            n = (depth - 2) // 6
            self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            cin = 16
            for i, planes in enumerate((16, 32, 64)):
                blocks = []
                for b in range(n):
                    blocks.append(Block(cin, planes, 2 if (i > 0 and b == 0) else 1))
                    cin = planes
                setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            self.linear = nn.Linear(64, 10)

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.layer3(self.layer2(self.layer1(out)))
            return self.linear(F.avg_pool2d(out, out.size()[3]).flatten(1))

    return ResNet().eval()


@pytest.fixture(scope="module")
def cifar_test(data_dir):
    path = data_dir / "cifar10" / "derived" / "cifar10_convnetjs_lossless.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    with np.load(path) as d:
        return d["test_x"], d["test_y"]


@pytest.fixture(scope="module")
def resnet20(data_dir):
    path = data_dir / AKAMASTER / "resnet20-12fca82f.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return load_akamaster_resnet(path, depth=20)


@pytest.mark.torch
def test_resnet20_matches_torch_on_real_images(data_dir, resnet20, cifar_test):
    torch = pytest.importorskip("torch")
    model, variables = resnet20
    images = cifar_test[0][:8].astype(np.float32) / 255.0
    ref_model = _akamaster_torch(20)
    th = torch.load(
        data_dir / AKAMASTER / "resnet20-12fca82f.th", map_location="cpu", weights_only=True
    )["state_dict"]
    ref_model.load_state_dict({k.removeprefix("module."): v for k, v in th.items()})
    mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
    std = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy((images.transpose(0, 3, 1, 2) - mean) / std)).numpy()
    out = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(images)))
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)


@pytest.mark.torch
def test_th_and_npz_give_the_same_variables(data_dir, resnet20):
    pytest.importorskip("torch")
    model, variables = load_akamaster_resnet(data_dir / AKAMASTER / "resnet20-12fca82f.th")
    assert model.depth == 20
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, resnet20[1])


def test_resnet20_accuracy_on_1000_test_images(resnet20, cifar_test):
    model, variables = resnet20
    assert isinstance(model, CifarResNet) and model.depth == 20
    images, labels = cifar_test
    logits = jax.jit(model.apply)(variables, jnp.asarray(images, jnp.float32) / 255.0)
    acc = float(np.mean(np.asarray(jnp.argmax(logits, -1)) == labels))
    assert abs(acc - 0.915) < 0.01, acc  # PROVENANCE.md: 91.5 % on lossless test[0:1000]


@pytest.mark.parametrize("depth, n_blocks", [(32, 5), (44, 7), (56, 9)])
def test_akamaster_depth_inferred(data_dir, depth, n_blocks):
    path = next((data_dir / AKAMASTER).glob(f"resnet{depth}-*.npz"), None)
    if path is None:
        pytest.skip(f"resnet{depth} .npz not found")
    model, variables = load_akamaster_resnet(path)
    assert model.depth == depth
    assert f"layer3_{n_blocks - 1}" in variables["params"]
    assert f"layer3_{n_blocks}" not in variables["params"]


def test_akamaster_errors(data_dir, tmp_path):
    path = data_dir / AKAMASTER / "resnet20-12fca82f.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_akamaster_resnet(tmp_path / "resnet20.npz")
    with pytest.raises(ValueError, match=r"state dict is for depth 20 .* got depth=32"):
        load_akamaster_resnet(path, depth=32)
    sd = load_state_dict_file(path)
    bad = {**sd, "layer2.0.conv1.weight": np.zeros((32, 16, 5, 5), np.float32)}
    with pytest.raises(
        ValueError,
        match=r"layer2\.0\.conv1\.weight: expected shape "
        r"\(32, 16, 3, 3\), got \(32, 16, 5, 5\)",
    ):
        cifar_resnet_from_state_dict(bad, 20)
    missing = {k: v for k, v in sd.items() if k != "layer3.2.bn2.running_var"}
    with pytest.raises(ValueError, match=r"missing.*layer3\.2\.bn2\.running_var"):
        cifar_resnet_from_state_dict(missing)
    extra = {**sd, "fc.weight": np.zeros((10, 64), np.float32)}
    with pytest.raises(ValueError, match=r"unexpected key.*fc\.weight"):
        cifar_resnet_from_state_dict(extra)
    # 'module.' prefixes (nn.DataParallel) and num_batches_tracked buffers are fine.
    wrapped = {f"module.{k}": v for k, v in sd.items()}
    wrapped["module.bn1.num_batches_tracked"] = np.array(10)
    _, variables = cifar_resnet_from_state_dict(wrapped, 20)
    np.testing.assert_array_equal(
        variables["params"]["conv1"]["kernel"], sd["conv1.weight"].transpose(2, 3, 1, 0)
    )
    with pytest.raises(ValueError, match="suffix"):
        (tmp_path / "w.txt").write_text("x")
        load_akamaster_resnet(tmp_path / "w.txt")


# --------------------------------------------------------------------------- RobustBench WRN


def _wrn_torch(depth, widen):
    """A small PyTorch re-implementation of RobustBench's wide_resnet.py (pre-activation)."""
    torch = pytest.importorskip("torch")
    nn, F = torch.nn, torch.nn.functional

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(cin)
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.equal = cin == cout
            self.convShortcut = (
                None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
            )

        def forward(self, x):
            act = F.relu(self.bn1(x))
            out = self.conv2(F.relu(self.bn2(self.conv1(act))))
            return out + (x if self.equal else self.convShortcut(act))

    class Stage(nn.Module):
        def __init__(self, n, cin, cout, stride):
            super().__init__()
            self.layer = nn.Sequential(
                *[Block(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)]
            )

        def forward(self, x):
            return self.layer(x)

    class WRN(nn.Module):
        def __init__(self):
            super().__init__()
            n = (depth - 4) // 6
            ch = [16, 16 * widen, 32 * widen, 64 * widen]
            self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
            self.block1 = Stage(n, ch[0], ch[1], 1)
            self.block2 = Stage(n, ch[1], ch[2], 2)
            self.block3 = Stage(n, ch[2], ch[3], 2)
            self.bn1 = nn.BatchNorm2d(ch[3])
            self.fc = nn.Linear(ch[3], 10)

        def forward(self, x):
            out = self.block3(self.block2(self.block1(self.conv1(x))))
            return self.fc(F.avg_pool2d(F.relu(self.bn1(out)), 8).flatten(1))

    torch.manual_seed(0)
    model = WRN()
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.mark.torch
def test_wide_resnet_matches_robustbench_layout():
    torch = pytest.importorskip("torch")
    ref_model = _wrn_torch(10, 2)
    model, variables = wide_resnet_from_state_dict(ref_model.state_dict(), 10, 2)
    x = np.random.default_rng(0).uniform(size=(4, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    out = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(x)))
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match=r"missing.*block1\.layer\.1\.bn1\.running_mean"):
        wide_resnet_from_state_dict(ref_model.state_dict(), 16, 2)


def test_load_state_dict_file_suffix_and_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_state_dict_file(pathlib.Path(tmp_path) / "nope.th")
    np.savez(tmp_path / "w.npz", a=np.ones((2, 3), np.float64))
    sd = load_state_dict_file(tmp_path / "w.npz")
    assert sd["a"].dtype == np.float32 and sd["a"].shape == (2, 3)


# ------------------------------------------------- RobustBench DeepMind WRN (WRN-70-16 layout)


def _dm_wrn_torch(depth, width, swish=True, seed=0, device=None):
    """A small PyTorch re-implementation of RobustBench's dm_wide_resnet.DMWideResNet."""
    torch = pytest.importorskip("torch")
    nn, F = torch.nn, torch.nn.functional
    act = nn.SiLU if swish else nn.ReLU
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2471, 0.2435, 0.2616]).view(1, 3, 1, 1)

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.batchnorm_0, self.relu_0 = nn.BatchNorm2d(cin), act()
            self.conv_0 = nn.Conv2d(cin, cout, 3, stride, 0, bias=False)
            self.batchnorm_1, self.relu_1 = nn.BatchNorm2d(cout), act()
            self.conv_1 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.has_shortcut = cin != cout
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False) if (
                self.has_shortcut) else None
            self.stride = stride

        def forward(self, x):
            a = self.relu_0(self.batchnorm_0(x))
            if self.has_shortcut:
                x = a
            a = F.pad(a, (1, 1, 1, 1) if self.stride == 1 else (0, 1, 0, 1))
            out = self.conv_1(self.relu_1(self.batchnorm_1(self.conv_0(a))))
            return (self.shortcut(x) if self.has_shortcut else x) + out

    class Group(nn.Module):
        def __init__(self, n, cin, cout, stride):
            super().__init__()
            self.block = nn.Sequential(
                *[Block(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])

        def forward(self, x):
            return self.block(x)

    class DMWRN(nn.Module):
        def __init__(self):
            super().__init__()
            n, ch = (depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width]
            self.init_conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
            self.layer = nn.Sequential(Group(n, ch[0], ch[1], 1), Group(n, ch[1], ch[2], 2),
                                       Group(n, ch[2], ch[3], 2))
            self.batchnorm, self.relu = nn.BatchNorm2d(ch[3]), act()
            self.logits = nn.Linear(ch[3], 10)

        def forward(self, x):
            out = self.layer(self.init_conv((x - mean) / std))
            out = F.avg_pool2d(self.relu(self.batchnorm(out)), 8)
            return self.logits(out.flatten(1))

    if device == "meta":
        with torch.device("meta"):
            return DMWRN()
    torch.manual_seed(seed)
    model = DMWRN()
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.mark.torch
def test_dm_wide_resnet_matches_robustbench_dm_layout():
    torch = pytest.importorskip("torch")
    from jaxrob.models import dm_wide_resnet_from_state_dict

    ref_model = _dm_wrn_torch(10, 2)
    sd = ref_model.state_dict()
    model, variables = dm_wide_resnet_from_state_dict(sd, 10, 2, activation="swish")
    x = np.random.default_rng(0).uniform(size=(4, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    out = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(x)))
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)
    # the two RobustBench WRN layouts are told apart by their names: each importer lists the
    # other's keys as missing / unexpected
    with pytest.raises(ValueError,
                       match=r"(?s)missing.*block1\.layer\.0\.bn1.*unexpected.*init_conv\.weight"):
        wide_resnet_from_state_dict(sd, 10, 2)
    plain = _wrn_torch(10, 2).state_dict()
    with pytest.raises(
            ValueError,
            match=r"(?s)missing.*layer\.0\.block\.0\.batchnorm_0.*unexpected.*block1\.layer"):
        dm_wide_resnet_from_state_dict(plain, 10, 2)
    # RobustBench's sub_block1=True models carry an unused group: accepted and ignored
    extra = {**plain, **{"sub_block1." + k.split(".", 1)[1]: v
                         for k, v in plain.items() if k.startswith("block1.")}}
    _, got = wide_resnet_from_state_dict(extra, 10, 2)
    _, ref_vars = wide_resnet_from_state_dict(plain, 10, 2)
    jax.tree.map(np.testing.assert_array_equal, got, ref_vars)


@pytest.mark.torch
def test_dm_wrn_70_16_layout_and_size():
    # Gowal2020Uncovering_70_16 / Rebuffi2021Fixing_70_16: every key and shape, shapes only
    from jaxrob.models import DMWideResNet
    from jaxrob.models._classifiers import _expected_variables

    ref = {k: tuple(v.shape) for k, v in
           _dm_wrn_torch(70, 16, device="meta").state_dict().items()
           if not k.endswith("num_batches_tracked")}
    shapes = _expected_variables(DMWideResNet(depth=70, width=16))
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(shapes["params"]))
    assert n_params == sum(int(np.prod(s)) for k, s in ref.items()
                           if not k.endswith(("running_mean", "running_var")))
    assert len(jax.tree.leaves(shapes)) == len(ref)
    assert n_params == 266_796_506
