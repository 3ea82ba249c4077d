"""Purifiers built on :mod:`jaxrob.diffusion`: DiffPure-style, multi-stage, GDMP-guided, majority
vote, DiffDefense reconstruction.

Public: :func:`diffpure` / :func:`multistage` build a :class:`Purifier` (``purify(x, key)``;
``purify(x, key, forward_key=k_f)`` takes the forward noise from ``k_f`` alone, as
``randomness="forward_lock"`` evaluations do),
:func:`gdmp` a :class:`GuidedPurifier` (GDMP: every reverse step guided towards the noised input
by the gradient of an MSE or :func:`ssim` distance; exact second-order or guidance-as-constant
gradients),
:func:`diffdefense` builds a :class:`DiffDefense` (``defence(x, key)``, and
``defence.reconstruct(x, key)`` -> :class:`Reconstruction` with the detection score),
:func:`resize_images` is the bilinear resize (PyTorch's ``align_corners=False``) a
:class:`Purifier` with ``input_size`` applies around its chain (DiffPure's ImageNet 224 -> 256
-> 224); :class:`DefendedModel` (or :func:`purified_logits`) puts a classifier behind it -- the
``logits_fn(x, key)`` that attacks and evaluations take -- :func:`majority_vote`, and
:func:`example_keys` (per-example keys from global indices).

Editing and PDM-Pure: :func:`sdedit` / :func:`sdeditor` (SDEdit on a pixel model, which is
:func:`diffpure` wrapped, or on a latent model through ``encode_fn`` / ``decode_fn``;
an :class:`SDEdit` is ``edit(x, key)``), :func:`pdm_pure` (PDM-Pure's purifier: SDEdit with a
pixel model at t* = 0.1 in 10 steps), :class:`PurifyThenEdit` (a purifier, then an edit, as one
``edit(x, key)``), and the paper's baselines :func:`jpeg` (PIL, quality 65) and
:func:`crop_resize` (central 80%, resized back).
"""

from jaxrob.purify._diffdefense import DD_GRADIENTS as DD_GRADIENTS
from jaxrob.purify._diffdefense import OUTPUTS as OUTPUTS
from jaxrob.purify._diffdefense import Z_GRADIENTS as Z_GRADIENTS
from jaxrob.purify._diffdefense import DiffDefense as DiffDefense
from jaxrob.purify._diffdefense import Reconstruction as Reconstruction
from jaxrob.purify._diffdefense import diffdefense as diffdefense
from jaxrob.purify._diffdefense import reference_learning_rate as reference_learning_rate
from jaxrob.purify._diffpure import GRADIENTS as GRADIENTS
from jaxrob.purify._diffpure import SAMPLERS as SAMPLERS
from jaxrob.purify._diffpure import DefendedModel as DefendedModel
from jaxrob.purify._diffpure import FixedRandomness as FixedRandomness
from jaxrob.purify._diffpure import Purifier as Purifier
from jaxrob.purify._diffpure import PurifyFn as PurifyFn
from jaxrob.purify._diffpure import diffpure as diffpure
from jaxrob.purify._diffpure import example_keys as example_keys
from jaxrob.purify._diffpure import majority_vote as majority_vote
from jaxrob.purify._diffpure import multistage as multistage
from jaxrob.purify._diffpure import purified_logits as purified_logits
from jaxrob.purify._diffpure import resize_images as resize_images
from jaxrob.purify._gdmp import DISTANCES as DISTANCES
from jaxrob.purify._gdmp import GDMP_GRADIENTS as GDMP_GRADIENTS
from jaxrob.purify._gdmp import GuidedPurifier as GuidedPurifier
from jaxrob.purify._gdmp import gdmp as gdmp
from jaxrob.purify._gdmp import guidance_scales as guidance_scales
from jaxrob.purify._gdmp import ssim as ssim
from jaxrob.purify._sdedit import SDEDIT_SAMPLERS as SDEDIT_SAMPLERS
from jaxrob.purify._sdedit import PurifyThenEdit as PurifyThenEdit
from jaxrob.purify._sdedit import SDEdit as SDEdit
from jaxrob.purify._sdedit import crop_resize as crop_resize
from jaxrob.purify._sdedit import jpeg as jpeg
from jaxrob.purify._sdedit import pdm_pure as pdm_pure
from jaxrob.purify._sdedit import sdedit as sdedit
from jaxrob.purify._sdedit import sdeditor as sdeditor
