"""Protective perturbations vs PDM-Pure on MNIST (Xue & Chen, "Pixel is a Barrier"; skeleton).

    python experiments/protect_eval.py --config configs/mnist_protect.py \\
        --workdir runs/mnist_protect

Protections (AdvDM(+/-), SDS(+/-), PhotoGuard, Mist) of 32 MNIST test images against the LDM,
then the LDM's SDEdit of (a) the protected images, (b) their PDM-Pure purification (the pixel
DDPM at t* = 0.1 in 10 steps), (c) JPEG q65, (d) a 20% crop resized back; edit quality against
the clean images' edits (FID on the MNIST classifier's penultimate features -- not
Inception-FID --, SSIM, PSNR); and the adaptive attack through PDM-Pure + the LDM edit.

The LDM: until the KL-autoencoder LDM lands, ``ldm.source = "pixel_standin"`` stands in for it
with the pixel DDPM itself behind the codec ``z = 2x - 1`` (the LDM's interface, not an LDM:
its "encoder" cannot amplify perturbations). Not timed yet on the 2-core CPU (expected: tens of
minutes for the full method list at 50 steps). Smoke: ``:smoke`` (random tiny UNet, 4 images,
2 steps, seconds).

MNIST values: Linf 0.1 (about 25/255; the reference's 16/255 is for 512^2 RGB photos), 50
steps of 0.01 (the reference: 100 of 1/255), Mist / SDS-target rate 1e3 (the texture term sums
over 784 latent entries, the diffusion term is a mean).
"""

from ml_collections import config_dict

from configs import _common

METHODS = ("none", "advdm", "advdm-", "sds+", "sds-", "photoguard", "mist")
PURIFICATIONS = ("none", "pdm_pure", "jpeg", "crop_resize")


def get_config(arg=None):
    arg = _common.parse_arg(arg)
    c = _common.robust_base()
    if arg == "smoke":
        _common.robust_smoke(c)  # random tiny UNet
    del c.attack, c.eval, c.rows
    # c.purifier (robust_base's: DDPM, t* = 0.1, 10 steps) is PDM-Pure's purifier (the paper's)
    c.data.test_split = "test[:32]"
    c.batch_size = 8  # images per chunk (a multiple of the device count)
    # the LDM: "pixel_standin" (the pixel DDPM behind z = 2x - 1) until the real one lands
    c.ldm = config_dict.ConfigDict({"source": "pixel_standin"})
    c.study = config_dict.ConfigDict({  # the protections
        "methods": METHODS,
        "eps": 0.1,
        "step_size": 0.01,
        "num_steps": 50,
        "eot_samples": 1,
        "rate": 1e3,  # Mist's semantic weight and SDS-with-target's SDS weight
        "target": "checkerboard",  # the texture target of PhotoGuard / Mist
        "target_period": 4,
    })
    c.edit = config_dict.ConfigDict({"strength": 0.3, "steps": 10, "sampler": "ddim"})
    c.purify = config_dict.ConfigDict({
        "methods": PURIFICATIONS,  # "pdm_pure" is c.purifier
        "jpeg_quality": 65, "crop": 0.2,  # the paper's baselines
    })
    c.adaptive = config_dict.ConfigDict({"enabled": True, "num_steps": 20, "eot_samples": 2,
                                         "targeted": False})
    if arg == "smoke":
        c.data.test_split = "test[:4]"
        c.data.num_images = 0
        c.batch_size = 4
        c.mesh.num_devices = 1
        c.study.update(methods=("none", "advdm", "sds-", "photoguard"), num_steps=2)
        c.edit.update(steps=2)  # (robust_smoke already set c.purifier.num_steps = 2)
        c.adaptive.update(num_steps=1, eot_samples=1)
    return c
