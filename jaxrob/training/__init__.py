"""Training: DDPM, classifier, ADDT and KL-autoencoder train steps, the resumable train loop,
evaluation helpers.

Everything here takes keyword arguments, never a config; ``experiments/`` turn configs into
calls. Checkpoints go through :mod:`jaxrob.checkpoint`.
"""

from jaxrob.training._addt import MAPPINGS as MAPPINGS
from jaxrob.training._addt import addt_ratio as addt_ratio
from jaxrob.training._addt import cgpo_delta as cgpo_delta
from jaxrob.training._addt import make_addt_optimizer as make_addt_optimizer
from jaxrob.training._addt import make_addt_train_step as make_addt_train_step
from jaxrob.training._addt import rbgm as rbgm
from jaxrob.training._autoencoder import RECON_LOSSES as RECON_LOSSES
from jaxrob.training._autoencoder import autoencoder_loss as autoencoder_loss
from jaxrob.training._autoencoder import encode_dataset as encode_dataset
from jaxrob.training._autoencoder import init_autoencoder_state as init_autoencoder_state
from jaxrob.training._autoencoder import latent_scaling_factor as latent_scaling_factor
from jaxrob.training._autoencoder import (
    make_autoencoder_train_step as make_autoencoder_train_step,
)
from jaxrob.training._autoencoder import reconstruction_metrics as reconstruction_metrics
from jaxrob.training._classifier import classifier_accuracy as classifier_accuracy
from jaxrob.training._classifier import classifier_loss as classifier_loss
from jaxrob.training._classifier import classifier_predictions as classifier_predictions
from jaxrob.training._classifier import cross_entropy as cross_entropy
from jaxrob.training._classifier import init_classifier_state as init_classifier_state
from jaxrob.training._classifier import make_classifier_train_step as make_classifier_train_step
from jaxrob.training._ddpm import ddpm_loss as ddpm_loss
from jaxrob.training._ddpm import denoising_mse as denoising_mse
from jaxrob.training._ddpm import init_ddpm_state as init_ddpm_state
from jaxrob.training._ddpm import make_ddpm_train_step as make_ddpm_train_step
from jaxrob.training._loop import METRICS_FILE as METRICS_FILE
from jaxrob.training._loop import MetricsWriter as MetricsWriter
from jaxrob.training._loop import read_metrics as read_metrics
from jaxrob.training._loop import step_batches as step_batches
from jaxrob.training._loop import train_loop as train_loop
from jaxrob.training._state import LR_SCHEDULES as LR_SCHEDULES
from jaxrob.training._state import OPTIMIZERS as OPTIMIZERS
from jaxrob.training._state import TrainState as TrainState
from jaxrob.training._state import abstract_on_mesh as abstract_on_mesh
from jaxrob.training._state import batched_apply as batched_apply
from jaxrob.training._state import create_train_state as create_train_state
from jaxrob.training._state import ema_update as ema_update
from jaxrob.training._state import init_on_mesh as init_on_mesh
from jaxrob.training._state import jit_train_step as jit_train_step
from jaxrob.training._state import learning_rate_schedule as learning_rate_schedule
from jaxrob.training._state import make_optimizer as make_optimizer
from jaxrob.training._state import normal_noise as normal_noise
