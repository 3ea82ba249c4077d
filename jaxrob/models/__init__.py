"""Models: :func:`load` a trained export as a ready pytree model, the Flax networks, weight import.

``jaxrob.models.load(path)`` returns a :class:`DiffusionModel` (``eps_fn(x_t, step)``, with its
schedule), a :class:`Classifier` (``logits_fn(x, key)``), an :class:`Autoencoder` (``encode``,
``encode_latent``, ``decode``) or a :class:`LatentDiffusionModel` (an autoencoder and a
``DiffusionModel`` on its latent codes); all are pytrees whose parameters are leaves. The
networks (:class:`UNet`, guided-diffusion's :class:`ADMUNet`, :class:`AutoencoderKL`,
:class:`SmallCNN`, :class:`CifarResNet`, :class:`WideResNet`, :class:`DMWideResNet`) and
PyTorch / diffusers / guided-diffusion weight import are here too
(``load_guided_diffusion(path)``: the ImageNet 256x256 ADM of DiffPure and PDM-Pure as a
``DiffusionModel`` in one call).
and score_sde's DDPM++ (:class:`NCSNpp`, DiffPure's CIFAR-10 model): :func:`load_score_sde`
turns its PyTorch checkpoint into a ``DiffusionModel`` in one call, :func:`convert_score_sde`
into an export.
torchvision's ImageNet :class:`ResNet` (DiffPure's ResNet-50): :func:`load_torchvision_resnet`
turns ``resnet50-0676ba61.pth`` into a ``Classifier`` in one call,
:func:`convert_torchvision_resnet` into an export.
"""

from jaxrob.models._adm import ADM_CONFIGS as ADM_CONFIGS
from jaxrob.models._adm import ADMUNet as ADMUNet
from jaxrob.models._adm import adm_config_from_guided_diffusion as adm_config_from_guided_diffusion
from jaxrob.models._adm import adm_from_config as adm_from_config
from jaxrob.models._adm import (
    adm_from_guided_diffusion_state_dict as adm_from_guided_diffusion_state_dict,
)
from jaxrob.models._adm import adm_from_metadata as adm_from_metadata
from jaxrob.models._adm import adm_learned_log_variance as adm_learned_log_variance
from jaxrob.models._adm import adm_num_params as adm_num_params
from jaxrob.models._adm import (
    convert_guided_diffusion_checkpoint as convert_guided_diffusion_checkpoint,
)
from jaxrob.models._adm import load_guided_diffusion as load_guided_diffusion
from jaxrob.models._autoencoder import AUTOENCODER_CONFIGS as AUTOENCODER_CONFIGS
from jaxrob.models._autoencoder import AutoencoderKL as AutoencoderKL
from jaxrob.models._autoencoder import (
    autoencoder_config_from_diffusers as autoencoder_config_from_diffusers,
)
from jaxrob.models._autoencoder import autoencoder_from_config as autoencoder_from_config
from jaxrob.models._autoencoder import (
    autoencoder_from_diffusers_state_dict as autoencoder_from_diffusers_state_dict,
)
from jaxrob.models._classifiers import AKAMASTER_MEAN as AKAMASTER_MEAN
from jaxrob.models._classifiers import AKAMASTER_STD as AKAMASTER_STD
from jaxrob.models._classifiers import CIFAR10_MEAN as CIFAR10_MEAN
from jaxrob.models._classifiers import CIFAR10_STD as CIFAR10_STD
from jaxrob.models._classifiers import MODELS as MODELS
from jaxrob.models._classifiers import CifarResNet as CifarResNet
from jaxrob.models._classifiers import DMWideResNet as DMWideResNet
from jaxrob.models._classifiers import SmallCNN as SmallCNN
from jaxrob.models._classifiers import WideResNet as WideResNet
from jaxrob.models._classifiers import cifar_resnet_from_state_dict as cifar_resnet_from_state_dict
from jaxrob.models._classifiers import (
    dm_wide_resnet_from_state_dict as dm_wide_resnet_from_state_dict,
)
from jaxrob.models._classifiers import load_akamaster_resnet as load_akamaster_resnet
from jaxrob.models._classifiers import wide_resnet_from_state_dict as wide_resnet_from_state_dict
from jaxrob.models._latent import Autoencoder as Autoencoder
from jaxrob.models._latent import LatentDiffusionModel as LatentDiffusionModel
from jaxrob.models._latent import autoencoder_from_metadata as autoencoder_from_metadata
from jaxrob.models._loaded import Classifier as Classifier
from jaxrob.models._loaded import DiffusionModel as DiffusionModel
from jaxrob.models._loaded import classifier_from_metadata as classifier_from_metadata
from jaxrob.models._loaded import (
    diffusion_module_from_metadata as diffusion_module_from_metadata,
)
from jaxrob.models._loaded import load as load
from jaxrob.models._loaded import schedule_from_metadata as schedule_from_metadata
from jaxrob.models._loaded import unet_from_metadata as unet_from_metadata
from jaxrob.models._ncsnpp import NCSNPP_CONFIGS as NCSNPP_CONFIGS
from jaxrob.models._ncsnpp import NCSNpp as NCSNpp
from jaxrob.models._ncsnpp import convert_score_sde as convert_score_sde
from jaxrob.models._ncsnpp import load_score_sde as load_score_sde
from jaxrob.models._ncsnpp import ncsnpp_config_from_score_sde as ncsnpp_config_from_score_sde
from jaxrob.models._ncsnpp import ncsnpp_export_metadata as ncsnpp_export_metadata
from jaxrob.models._ncsnpp import ncsnpp_from_config as ncsnpp_from_config
from jaxrob.models._ncsnpp import ncsnpp_from_state_dict as ncsnpp_from_state_dict
from jaxrob.models._ncsnpp import vp_schedule as vp_schedule
from jaxrob.models._random import random_variables as random_variables
from jaxrob.models._resnet import IMAGENET_MEAN as IMAGENET_MEAN
from jaxrob.models._resnet import IMAGENET_STD as IMAGENET_STD
from jaxrob.models._resnet import RESNET_CONFIGS as RESNET_CONFIGS
from jaxrob.models._resnet import ResNet as ResNet
from jaxrob.models._resnet import convert_torchvision_resnet as convert_torchvision_resnet
from jaxrob.models._resnet import load_torchvision_resnet as load_torchvision_resnet
from jaxrob.models._resnet import resnet_export_metadata as resnet_export_metadata
from jaxrob.models._resnet import (
    resnet_from_torchvision_state_dict as resnet_from_torchvision_state_dict,
)
from jaxrob.models._torch_import import load_state_dict_file as load_state_dict_file
from jaxrob.models._unet import UNET_CONFIGS as UNET_CONFIGS
from jaxrob.models._unet import UNet as UNet
from jaxrob.models._unet import timestep_embedding as timestep_embedding
from jaxrob.models._unet import unet_config_from_diffusers as unet_config_from_diffusers
from jaxrob.models._unet import unet_from_config as unet_from_config
from jaxrob.models._unet import unet_from_diffusers_state_dict as unet_from_diffusers_state_dict
