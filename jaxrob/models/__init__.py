"""Flax linen networks (diffusion UNet, classifiers) and weight import from PyTorch."""

from jaxrob.models._classifiers import AKAMASTER_MEAN as AKAMASTER_MEAN
from jaxrob.models._classifiers import AKAMASTER_STD as AKAMASTER_STD
from jaxrob.models._classifiers import MODELS as MODELS
from jaxrob.models._classifiers import CifarResNet as CifarResNet
from jaxrob.models._classifiers import SmallCNN as SmallCNN
from jaxrob.models._classifiers import WideResNet as WideResNet
from jaxrob.models._classifiers import cifar_resnet_from_state_dict as cifar_resnet_from_state_dict
from jaxrob.models._classifiers import load_akamaster_resnet as load_akamaster_resnet
from jaxrob.models._classifiers import wide_resnet_from_state_dict as wide_resnet_from_state_dict
from jaxrob.models._torch_import import load_state_dict_file as load_state_dict_file
from jaxrob.models._unet import UNET_CONFIGS as UNET_CONFIGS
from jaxrob.models._unet import UNet as UNet
from jaxrob.models._unet import timestep_embedding as timestep_embedding
from jaxrob.models._unet import unet_config_from_diffusers as unet_config_from_diffusers
from jaxrob.models._unet import unet_from_config as unet_from_config
from jaxrob.models._unet import unet_from_diffusers_state_dict as unet_from_diffusers_state_dict
