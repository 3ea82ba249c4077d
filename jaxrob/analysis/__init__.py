"""Why is a purifier robust? Distances, randomness decomposition, Jacobian spectra, compression,
and curve fits with confidence intervals (Yuezhang & Wei, arXiv 2505.22839); loss landscapes
and attack trajectories under given purifier keys, stochastic vs DW-box (Liu et al., ICLR 2025):
:func:`loss_landscape`, :func:`landscape_directions`, :func:`attack_trajectory`.

Analysis functions take callables: ``purify(x, key)``, a fixed-randomness ``f(x)``, or any
differentiable map of one image; forward-mode Jacobians need models built with
``fast_vjp=False`` (``ad="vjp"`` / ``jacrev`` / ``vjp_chunks`` work with either).
"""

from jaxrob.analysis._compression import EmpiricalCompression as EmpiricalCompression
from jaxrob.analysis._compression import SpectralCompression as SpectralCompression
from jaxrob.analysis._compression import compression_rate_empirical as compression_rate_empirical
from jaxrob.analysis._compression import spectral_compression as spectral_compression
from jaxrob.analysis._distances import l2_distance as l2_distance
from jaxrob.analysis._distances import linf_distance as linf_distance
from jaxrob.analysis._distances import ssim as ssim
from jaxrob.analysis._distances import trajectory_distances as trajectory_distances
from jaxrob.analysis._fits import FuzzyRobustness as FuzzyRobustness
from jaxrob.analysis._fits import PsychometricFit as PsychometricFit
from jaxrob.analysis._fits import SigmoidFit as SigmoidFit
from jaxrob.analysis._fits import fit_sigmoid as fit_sigmoid
from jaxrob.analysis._fits import fuzzy_robustness as fuzzy_robustness
from jaxrob.analysis._fits import psychometric_threshold as psychometric_threshold
from jaxrob.analysis._jacobian import AD_MODES as AD_MODES
from jaxrob.analysis._jacobian import METHODS as METHODS
from jaxrob.analysis._jacobian import SVD_METHODS as SVD_METHODS
from jaxrob.analysis._jacobian import jacobian as jacobian
from jaxrob.analysis._jacobian import singular_values as singular_values
from jaxrob.analysis._jacobian import top_singular_values as top_singular_values
from jaxrob.analysis._landscape import DIRECTION_KINDS as DIRECTION_KINDS
from jaxrob.analysis._landscape import attack_trajectory as attack_trajectory
from jaxrob.analysis._landscape import landscape_directions as landscape_directions
from jaxrob.analysis._landscape import loss_landscape as loss_landscape
from jaxrob.analysis._randomness import RandomnessDecomposition as RandomnessDecomposition
from jaxrob.analysis._randomness import RandomnessSummary as RandomnessSummary
from jaxrob.analysis._randomness import displacement_correlations as displacement_correlations
from jaxrob.analysis._randomness import randomness_decomposition as randomness_decomposition
from jaxrob.analysis._summaries import SpectrumSummary as SpectrumSummary
from jaxrob.analysis._summaries import spectrum_summary as spectrum_summary
