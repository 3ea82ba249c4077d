"""Diffusion core: schedules, the forward process, reverse steps, samplers (pure functions)."""

from jaxrob.diffusion._forward import eps_to_score as eps_to_score
from jaxrob.diffusion._forward import from_model_space as from_model_space
from jaxrob.diffusion._forward import predict_eps as predict_eps
from jaxrob.diffusion._forward import predict_x0 as predict_x0
from jaxrob.diffusion._forward import q_mean_std as q_mean_std
from jaxrob.diffusion._forward import q_sample as q_sample
from jaxrob.diffusion._forward import score_to_eps as score_to_eps
from jaxrob.diffusion._forward import to_model_space as to_model_space
from jaxrob.diffusion._reverse import VARIANCES as VARIANCES
from jaxrob.diffusion._reverse import ddim_step as ddim_step
from jaxrob.diffusion._reverse import ddpm_step as ddpm_step
from jaxrob.diffusion._reverse import posterior_mean_var as posterior_mean_var
from jaxrob.diffusion._samplers import SAMPLERS as SAMPLERS
from jaxrob.diffusion._samplers import EpsFn as EpsFn
from jaxrob.diffusion._samplers import ddim_sample as ddim_sample
from jaxrob.diffusion._samplers import ddpm_sample as ddpm_sample
from jaxrob.diffusion._samplers import generate as generate
from jaxrob.diffusion._samplers import step_noise as step_noise
from jaxrob.diffusion._samplers import vpsde_sample as vpsde_sample
from jaxrob.diffusion._schedules import Schedule as Schedule
from jaxrob.diffusion._schedules import cosine_schedule as cosine_schedule
from jaxrob.diffusion._schedules import from_betas as from_betas
from jaxrob.diffusion._schedules import linear_schedule as linear_schedule
from jaxrob.diffusion._schedules import respace as respace
from jaxrob.diffusion._schedules import truncated as truncated
from jaxrob.diffusion._vpsde import VPSDE as VPSDE
