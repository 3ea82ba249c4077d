"""Protective perturbations vs PDM-Pure on MNIST (Xue & Chen, "Pixel is a Barrier").

    python experiments/protect_eval.py --config configs/mnist_protect.py \\
        --workdir runs/mnist_protect
    python experiments/protect_table.py runs/mnist_protect/results.json

The LDM: ``ldm.source = "mnist_ldm"`` (default: the committed KL-autoencoder LDM,
``checkpoints/mnist_ldm``, 28x28x1 -> 7x7x4 scaled codes, its latent DDPM on those codes) or
``"pixel_standin"`` (the pixel DDPM behind ``z = 2x - 1``: the LDM's interface without an
encoder). The PDM (``c.ddpm``) is the committed pixel MNIST DDPM; PDM-Pure (``c.purifier``) is
its SDEdit at t* = 0.1 in 10 DDPM steps (the paper's).

Sized for the shared 2-core CPU (one run well under an hour): the first 32 MNIST test images;
radii 4, 8, 16 /255 (the paper's) and 32/255 (MNIST scale), run 16, 32, 8, 4 (a run stopped
early has the important ones); 20 sign steps of eps / 8 (the reference: 100 steps of 1/255 at
16/255, i.e. eps / 16); the expensive end-to-end attacks (``pdm_sdedit`` through the PDM's
SDEdit, and the adaptive attack through PDM-Pure + the LDM edit with EoT 2) 6 steps at 16/255
and 32/255 only. Edits: SDEdit at strength 0.3 in 10 DDIM
steps (LDM on codes, PDM on pixels). Mist's semantic weight 1e3 (the texture term sums over the
196 code entries, the diffusion term is a mean). Smoke: ``:smoke`` (random tiny UNet as PDM and
pixel stand-in LDM, 4 images, 2 steps, seconds of compute).
"""

from ml_collections import config_dict

from configs import _common

METHODS = ("none", "advdm", "advdm-", "sds+", "sds-", "photoguard", "mist", "pdm_advdm",
           "pdm_sdedit")
PIPELINES = ("ldm", "pdm", "pdm_pure", "jpeg", "crop")


def get_config(arg=None):
    arg = _common.parse_arg(arg)
    c = _common.robust_base()
    if arg == "smoke":
        _common.robust_smoke(c)  # random tiny UNet
    del c.attack, c.eval, c.rows
    # c.purifier (robust_base's: DDPM, t* = 0.1, 10 steps) is PDM-Pure's purifier (the paper's)
    c.data.test_split = "test[:32]"
    c.batch_size = 32  # images per chunk (a multiple of the device count)
    c.ldm = config_dict.ConfigDict({"source": "mnist_ldm", "path": "checkpoints/mnist_ldm"})
    c.study = config_dict.ConfigDict({  # the protections
        "methods": METHODS,
        "eps": (16 / 255, 32 / 255, 8 / 255, 4 / 255),  # run in this order
        "heavy_eps": (16 / 255, 32 / 255),  # pdm_sdedit's radii
        "step_ratio": 0.125,  # step size = step_ratio * eps
        "num_steps": 20,
        "heavy_num_steps": 6,
        "eot_samples": 1,
        "rate": 1e3,  # Mist's semantic weight
        "target": "checkerboard",  # the texture target of PhotoGuard / Mist
        "target_period": 4,
    })
    c.edit = config_dict.ConfigDict({"strength": 0.3, "steps": 10, "sampler": "ddim"})
    c.purify = config_dict.ConfigDict({
        "pipelines": PIPELINES,  # "pdm_pure" is c.purifier then the LDM edit
        "jpeg_quality": 65, "crop": 0.2,  # the paper's baselines
    })
    c.adaptive = config_dict.ConfigDict({"enabled": True, "eps": (16 / 255, 32 / 255),
                                         "num_steps": 6, "eot_samples": 2})
    c.grids = config_dict.ConfigDict({"enabled": True, "directory": "docs/figures/protect",
                                      "eps": (16 / 255, 32 / 255), "num_images": 8})
    if arg == "smoke":
        c.ldm.source = "pixel_standin"
        c.data.test_split = "test[:4]"
        c.data.num_images = 0
        c.batch_size = 4
        c.mesh.num_devices = 1
        c.study.update(methods=("none", "advdm", "photoguard", "pdm_sdedit"), num_steps=2,
                       heavy_num_steps=1, eps=(8 / 255, 32 / 255), heavy_eps=(32 / 255,))
        c.edit.update(steps=2)  # (robust_smoke already set c.purifier.num_steps = 2)
        c.adaptive.update(eps=(32 / 255,), num_steps=1, eot_samples=1)
        c.grids.enabled = False
    return c
