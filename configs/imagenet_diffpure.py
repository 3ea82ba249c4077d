"""DiffPure on ImageNet (Nie et al. 2022): guided-diffusion's 256x256 ADM, t_star 0.15, ResNet-50.

What exists, and what does not (yet):

* the diffusion model: ``ddpm.path`` is guided-diffusion's ``256x256_diffusion_uncond.pt``
  (openai/guided-diffusion; 552,814,086 parameters, learned sigma). ``ddpm.source =
  "guided_diffusion"`` imports it in one call (``experiments/_common.load_ddpm``: a missing file
  raises ``FileNotFoundError`` naming ``ddpm.path`` and the path), or convert it once and point
  ``ddpm.source = "export"`` at the export::

      python -c "import jaxrob.models as m; m.convert_guided_diffusion_checkpoint(
          '256x256_diffusion_uncond.pt', 'checkpoints/imagenet_adm')"

  The purifier uses the eps half of the learned-sigma output (as DiffPure's VP-SDE runner does);
* the classifier: ``classifier.path`` names torchvision's ResNet-50 weights
  (``resnet50-0676ba61.pth``, IMAGENET1K_V1, what DiffPure's ``pretrained=True`` loads), but
  jaxrob has NO ResNet-50 network or importer yet, so ``classifier.source =
  "torchvision_resnet50"`` is refused by the experiments' ``load_classifier``;
* the data: jaxrob.data has NO ImageNet reader yet (``data.name = "imagenet"`` is refused by
  ``load_dataset``); DiffPure evaluates 512 validation images (32 data seeds x 16), resized
  224 -> 256 around the purifier (bilinear);
* the settings recorded here are DiffPure's ImageNet ones: t* = 0.15 (its ``t=150``), Linf
  eps 4/255, VP-SDE reverse process (``sampler="sde"``, dt = 1e-3, 150 Euler steps).

So today only the ``:smoke`` variant's purifier is built (a tiny random ADM at 16x16; tests);
once the classifier and the data exist, the run is::

    python experiments/robust_eval.py --config configs/imagenet_diffpure.py --workdir runs/imagenet_diffpure

The full config
is the parameter record for the GPU/TPU run once the two missing pieces exist. Memory: the ADM
alone is 2.2 GB of float32 parameters.
"""

from configs import _common

# the files a user downloads (nothing can be downloaded here)
ADM_FILE = "256x256_diffusion_uncond.pt"
RESNET50_FILE = "resnet50-0676ba61.pth"


def get_config(arg=None):
    arg = _common.parse_arg(arg)
    c = _common.robust_eval_options(_common.robust_base())
    c.data = _common.data("imagenet", "train", "val[:512]")
    c.data.num_images = 0
    c.data.image_size = 256  # the ADM's resolution; DiffPure resizes 224 -> 256 -> 224
    c.ddpm.source = "guided_diffusion"
    c.ddpm.path = ADM_FILE  # repo-relative or absolute
    c.ddpm.model = _common.config_dict.ConfigDict({"name": "adm", "config": "imagenet256_uncond"})
    # guided-diffusion's linear 1000-step schedule (beta 1e-4 .. 0.02)
    c.ddpm.diffusion.update(schedule="linear", num_steps=1000, beta_start=1e-4, beta_end=0.02)
    c.classifier = _common.config_dict.ConfigDict({
        "source": "torchvision_resnet50",  # no importer in jaxrob yet (module docstring)
        "path": RESNET50_FILE,
    })
    c.purifier.update(sampler="sde", t_star=0.15, num_steps=150)
    c.attack.update(eps=4 / 255, num_steps=20, eot_samples=20, step_size=1 / 255)
    c.eval.batch_size = 4
    if arg == "smoke":
        c.data.image_size = 16
        c.ddpm.source = "random"
        c.ddpm.model.overrides = _common.config_dict.ConfigDict({
            "image_size": 16, "ch": 32, "ch_mult": (1, 2), "num_res_blocks": 1,
            "attn_resolutions": (8,), "num_head_channels": 16})
        c.purifier.num_steps = 2
        c.attack.update(num_steps=2, eot_samples=2)
    return c
