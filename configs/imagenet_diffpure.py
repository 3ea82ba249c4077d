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
  (``resnet50-0676ba61.pth``, IMAGENET1K_V1, what DiffPure's ``pretrained=True`` loads);
  ``classifier.source = "torchvision_resnet50"`` imports it in one call
  (``jaxrob.models.load_torchvision_resnet``; a missing file raises ``FileNotFoundError`` naming
  ``classifier.path``), or convert it once and use ``classifier.source = "export"``::

      python -c "import jaxrob.models as m; m.convert_torchvision_resnet(
          'resnet50-0676ba61.pth', 'checkpoints/imagenet_resnet50')"

  ``classifier.input_size = 224``: the ResNet resizes any input of another size to 224x224
  (bilinear; a no-op here, where the purifier hands it 224x224 images);
* the data: ``data.imagenet_dir`` is the ILSVRC2012 validation folder (one sub-folder per wnid,
  as torchvision's ``ImageNet`` / ``ImageFolder`` read it; or the flat folder of 50,000 JPEGs with
  ``data.labels_file`` = ``LOC_val_solution.csv`` or the devkit's
  ``ILSVRC2012_validation_ground_truth.txt`` + ``data.meta_file`` = its ``meta.mat``); relative
  paths are taken from the data directory (``$JAXROB_DATA_DIR``). Read by
  ``jaxrob.data.load_imagenet``: classes in torchvision's order (sorted wnids), examples in
  ``ImageFolder`` order, only the first ``val[:512]`` decoded; a missing folder raises
  ``FileNotFoundError`` naming ``data.imagenet_dir``. Preprocessing: shorter side resized to
  ``data.resize_size`` = 256, center crop ``data.image_size`` = 224 (DiffPure's
  ``Resize(256)`` + ``CenterCrop(224)``). Each image is decoded when its row is first read, so
  on several JAX processes each decodes only the rows its devices hold (docs/multihost.md);
* the geometry is DiffPure's (``eval_sde_adv.py``): the attack works on the 224x224 crops; the
  purifier (``purifier.input_size = 256``) upsamples its input 224 -> 256, runs the ADM at 256
  and downsamples the result 256 -> 224 for the ResNet, both resizes bilinear as PyTorch's
  ``F.interpolate(..., mode="bilinear", align_corners=False)`` and inside the purifier, so
  the attack's gradients go through them. (DiffPure resizes the output in [-1, 1] before
  mapping it to [0, 1]; jaxrob clips the purified image to [0, 1] first: a linear map either
  way, they differ only where the sample leaves [-1, 1].)
* DiffPure evaluates 512 validation images (32 data seeds x 16); the settings recorded here are
  its ImageNet ones: t* = 0.15 (its ``t=150``), Linf eps 4/255, VP-SDE reverse process
  (``sampler="sde"``, dt = 1e-3, 150 Euler steps).

With the three files in place the run is::

    python experiments/robust_eval.py --config configs/imagenet_diffpure.py \\
        --workdir runs/imagenet_diffpure --config.data.imagenet_dir=/path/to/imagenet/val \\
        --config.ddpm.path=/path/to/256x256_diffusion_uncond.pt \\
        --config.classifier.path=/path/to/resnet50-0676ba61.pth

It has not been run here (no ImageNet, no weights, no accelerator). ``:smoke`` runs the same
code path on CPU in about a minute: a random tiny ADM and a random tiny ResNet (basic blocks,
stages (1, 1, 1, 1)), on 4 Tiny-ImageNet val images (the registered ``tiny_imagenet`` zip
reader) resized 64 -> 28 by ``data.image_size``, purified at 32x32 (``purifier.input_size``:
28 -> 32 -> 28, DiffPure's 224 -> 256 -> 224 shrunk).

Memory: the ADM alone is 2.2 GB of float32 parameters.
"""

from configs import _common

# the files a user downloads (nothing can be downloaded here)
ADM_FILE = "256x256_diffusion_uncond.pt"
RESNET50_FILE = "resnet50-0676ba61.pth"
IMAGENET_VAL_DIR = "imagenet/val"  # under the data directory, or absolute


def get_config(arg=None):
    arg = _common.parse_arg(arg)
    c = _common.robust_eval_options(_common.robust_base())
    c.data = _common.data("imagenet", "train", "val[:512]")
    c.data.num_images = 0
    c.data.image_size = 224  # the center crop: the attack's space (DiffPure's CenterCrop(224))
    c.data.resize_size = 256  # the shorter side before the crop (DiffPure's Resize(256))
    c.data.imagenet_dir = IMAGENET_VAL_DIR
    c.data.labels_file = ""  # a flat folder's labels (LOC_val_solution.csv / devkit ground truth)
    c.data.meta_file = ""  # the devkit's meta.mat, with its ground-truth labels file
    c.ddpm.source = "guided_diffusion"
    c.ddpm.path = ADM_FILE  # repo-relative or absolute
    c.ddpm.model = _common.config_dict.ConfigDict({"name": "adm", "config": "imagenet256_uncond"})
    # guided-diffusion's linear 1000-step schedule (beta 1e-4 .. 0.02)
    c.ddpm.diffusion.update(schedule="linear", num_steps=1000, beta_start=1e-4, beta_end=0.02)
    c.classifier = _common.config_dict.ConfigDict({
        "source": "torchvision_resnet50",  # or "export" (convert_torchvision_resnet)
        "path": RESNET50_FILE,  # repo-relative or absolute
        "input_size": 224,  # the ResNet's size (inputs of another size are resized to it)
        # source "random" (smoke): a random classifier of this jaxrob.models.MODELS entry
        "model": {"name": "resnet", "kwargs": {"block": "bottleneck",
                                               "stage_sizes": (3, 4, 6, 3)}},
        "num_classes": 1000,
        "seed": 0,
    })
    c.purifier.update(sampler="sde", t_star=0.15, num_steps=150)
    # the ADM's side: the purifier resizes 224 -> 256 before the chain and 256 -> 224 after it
    c.purifier.input_size = 256
    c.attack.update(eps=4 / 255, num_steps=20, eot_samples=20, step_size=1 / 255)
    c.eval.batch_size = 4
    if arg == "smoke":
        # 4 Tiny-ImageNet val images (the registered zip reader) resized 64 -> 28, a random tiny
        # ADM at 32 (DiffPure's geometry shrunk: 28 -> 32 -> 28, as 224 -> 256 -> 224) and a
        # random tiny ResNet; the ImageNet folder reader is tested on its own (tests/data)
        c.data.update(name="tiny_imagenet", test_split="val[:4]", image_size=28)
        c.purifier.input_size = 32
        c.ddpm.source = "random"
        c.ddpm.model.overrides = _common.config_dict.ConfigDict({
            "image_size": 32, "ch": 32, "ch_mult": (1, 2), "num_res_blocks": 1,
            "attn_resolutions": (16,), "num_head_channels": 16})
        c.classifier.update(source="random", input_size=None, num_classes=200)
        c.classifier.model.kwargs.update(block="basic", stage_sizes=(1, 1, 1, 1))
        c.purifier.num_steps = 2
        c.attack.update(num_steps=2, eot_samples=2)
        # one padded chunk of 8 (a multiple of the tests' 8 host devices), one protocol
        c.eval.update(protocols=("one_shot",), batch_size=8)
    return c
