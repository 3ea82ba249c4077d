"""configs/imagenet_diffpure.py: DiffPure's ImageNet settings on guided-diffusion's ADM.

Shapes only (``jax.eval_shape``): the ADM import and forward pass are tested in
tests/models/test_adm.py.
"""

import jax
import jax.numpy as jnp
import pytest
from exp_helpers import load_config

import jaxrob
from experiments import _common as exp_common
from jaxrob.models import ADMUNet, DiffusionModel


def test_missing_checkpoint_and_classifier_fail_clearly():
    c = load_config("imagenet_diffpure")
    assert c.purifier.t_star == 0.15 and c.ddpm.model.name == "adm"
    assert c.ddpm.path.endswith("256x256_diffusion_uncond.pt")
    with pytest.raises(FileNotFoundError, match=r"ddpm\.path: .*256x256_diffusion_uncond\.pt"):
        exp_common.load_ddpm(c.ddpm, (256, 256, 3))
    with pytest.raises(ValueError, match="torchvision_resnet50"):
        exp_common.load_classifier(c.classifier, c.data)
    # a guided-diffusion file with a Ho et al. UNet description is refused before any reading
    c.ddpm.model = {"name": "unet", "config": "cifar10"}
    with pytest.raises(ValueError, match="guided-diffusion checkpoints are ADMs"):
        exp_common.load_ddpm(c.ddpm, (256, 256, 3))


def test_smoke_variant_builds_the_adm_purifier():
    c = load_config("imagenet_diffpure", "smoke")
    model, info = exp_common.load_ddpm(c.ddpm, (16, 16, 3))
    assert isinstance(model, DiffusionModel) and isinstance(model.module, ADMUNet)
    assert model.module.learn_sigma and model.module.output == "eps"
    assert info["source"] == "random" and model.schedule.num_steps == 1000
    purify = exp_common.make_purifier(c.purifier, model)
    x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
    out = jax.eval_shape(purify, x, jax.random.key(0))
    assert out.shape == (2, 16, 16, 3)
    assert isinstance(purify, jaxrob.purify.Purifier)
