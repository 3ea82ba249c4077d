"""DiffPure on CIFAR-10 with the Ho et al. UNet (35.7M parameters): for accelerators.

    python experiments/robust_eval.py --config configs/cifar10_robust.py --workdir runs/cifar10_robust \\
        --config.ddpm.path=/path/to/google-ddpm-cifar10-32/diffusion_pytorch_model.bin

DiffPure's CIFAR-10 Linf setting (t_star 0.1, eps 8/255) with the DDPM sampler (100 reverse
steps; Lee & Kim's purifier family) on the Ho et al. CIFAR-10 UNet imported from a diffusers
``UNet2DModel`` state dict that the user downloads (google/ddpm-cifar10-32; nothing can be
downloaded here), and akamaster's pretrained ResNet-20 (in the data dir) as the classifier.
PGD-20 with EoT 10 and exact gradients, stochastic and fixed randomness, one-shot and
worst-of-10 on 512 lossless test images. On CPU only ``:smoke`` runs (random UNet weights,
4 images, 2 steps, tens of seconds); the full config needs a GPU/TPU. On several devices
with a small batch, ``--config.mesh.eot_devices=2`` (or 5, 10: a divisor of EoT 10 and of
the device count) splits each image's EoT samples over devices too (``configs/_common.py``'s
``mesh``).

``:autoattack_classifier``: AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square 5000 queries,
100 iterations) on the ResNet-20 alone, Linf 8/255, the 1000 lossless test images, batch 250,
scored one-shot (a tiny random diffusion model stands in, unused). CPU: not run through
robust_eval yet; ``benchmarks/bench_autoattack.py`` runs the same attack (same key, same
per-example keys) next to the original PyTorch AutoAttack: 16 min on the 2 loaded cores.
"""

from configs import _common


def get_config(arg=None):
    arg = _common.parse_arg(arg, ("", "smoke", "autoattack_classifier"))
    c = _common.robust_eval_options(_common.robust_base())
    c.data = _common.data("cifar10", "train", "test[:512]")
    c.data.num_images = 0
    c.ddpm.source = "diffusers"
    c.ddpm.path = "google-ddpm-cifar10-32/diffusion_pytorch_model.bin"
    c.ddpm.model = _common.config_dict.ConfigDict({
        "name": "unet", "config": "cifar10", "overrides": _common.unet_overrides(dropout=0.0)})
    c.classifier = _common.config_dict.ConfigDict({
        "source": "akamaster",
        "path": "pretrained_cifar10_resnet_akamaster/resnet20-12fca82f.npz"})
    c.purifier.update(t_star=0.1, num_steps=100)
    c.attack.update(eps=8 / 255, num_steps=20, eot_samples=10, step_size=2 / 255)
    c.eval.batch_size = 64
    c.rows = ({"name": "ddpm_exact"},
              {"name": "ddpm_fixed", "eval": {"randomness": "fixed"}, "attack": {"eot_samples": 1}})
    if arg == "smoke":
        c.ddpm.source = "random"
        c.ddpm.model.overrides = _common.unet_overrides(
            dropout=0.0, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,),
            num_groups=4)
        c.purifier.num_steps = 2
        c.attack.update(num_steps=2, eot_samples=2)
        c.eval.update(protocols=("one_shot", "worst_of@2"), batch_size=8)
        c.data.test_split = "test[:8]"
        c.rows = ({"name": "ddpm_exact"},)
    elif arg == "autoattack_classifier":
        _common.robust_smoke(c)  # the tiny random UNet: loaded, never used (no purifier)
        _common.autoattack_classifier(c, "test[:1000]")
    return c
