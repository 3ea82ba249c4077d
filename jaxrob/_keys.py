"""Every ``fold_in`` tag of the library, in one place.

A result never depends on batch size, chunking or device count because every random draw is a
``fold_in`` chain from the run's key: example ``i`` gets ``k_i = fold_in(key, index_i)``, and each
use of ``k_i`` folds in one of the tags below. Two studies that say "the fixed purifier key" use
``fold(k_i, FIXED)`` and nothing else.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.random as jr

# purification: the forward noise and the reverse steps' noise of one stage
PURIFY_FORWARD = 0
PURIFY_REVERSE = 1

# DiffDefense reconstruction (jaxrob.purify.diffdefense): restart r starts from
# z_T = normal(fold_in(fold_in(key, RECON_INIT), r)); its reverse passes draw their noise (eta > 0)
# from fold_in(fold_in(fold_in(key, RECON_REVERSE), r), iteration)
RECON_INIT = 0
RECON_REVERSE = 1

# evaluation (per example ``k_i``)
ATTACK = 1  # the attack's own randomness, and in stochastic mode its purifier keys
CLEAN = 2  # the purifications that score the clean input
ADV = 3  # the purifications that score the adversarial input
FIXED = 4  # the one purifier key of randomness="fixed" (attack and scoring alike), and the
# forward-noise key of randomness="forward_lock" (so its forward noise is the fixed mode's)
# a randomised classifier's key inside a defended model: folded into the same key as the
# purifier's stage index (multistage), so far above any number of stages
CLASSIFIER = 1_000_005
STUDY = 6  # a study's own randomness (directions, probes) beside the purifier's


def fold(key, data):
    """``fold_in(key, data)`` for one key or a (B,) batch of keys."""
    if jnp.ndim(key) == 1:
        return jax.vmap(lambda k: jr.fold_in(k, data))(key)
    return jr.fold_in(key, data)


def example_keys(key, indices):
    """Per-example keys ``fold_in(key, index)`` for global example indices (shape (B,))."""
    return jax.vmap(lambda i: jr.fold_in(key, i))(jnp.asarray(indices, jnp.uint32))


# Further draws of the analysis studies, folded into k_i beside the tags above.
# LANCZOS keeps the value jacobian_spectrum's records were made with; it equals CLASSIFIER's,
# which is only ever folded into a purifier key, never into k_i itself.
LANCZOS = 5  # the start vector of a matrix-free top-k spectrum (jacobian_spectrum)
PROBE = 7  # a random check vector, e.g. a dense Jacobian's self-check (jacobian_spectrum)
CURVE = 8  # purifier keys of the points along a direction (critical_threshold)
FIXED_EXTRA = 9  # a study's further fixed purifier keys beside FIXED's (critical_threshold)

# ADDT training (jaxrob.training.make_addt_train_step, cgpo_delta): folded into example i's key
# of a train step, or into the key handed to cgpo_delta (never into an evaluation's k_i).
ADDT_POSITION = 10  # the schedule position n drawn for the example
ADDT_NOISE = 11  # the forward noise eps (train step); CGPO iteration k folds k in after it
ADDT_CGPO = 12  # the key the train step hands to cgpo_delta
ADDT_DELTA = 13  # CGPO's starting delta ~ N(0, I) (the whole delta when num_iters = 0)
ADDT_MAP = 14  # RBGM's fresh Gaussian sample of CGPO iteration k (then k folded in)

# Fixed-AutoAttack (evaluation, per example k_i): candidate c of the extra candidates (attack
# iterates, further attacks' results) is purified with keys fold_in(fold_in(fold_in(k_i,
# CANDIDATE), c), v); attack j >= 1 of a sequence of attacks gets fold_in(fold_in(k_i, ENSEMBLE),
# j) (attack 0 keeps ATTACK's key).
CANDIDATE = 20
ENSEMBLE = 21

# Inside one attack's key, beside the restart indices 0 .. num_restarts - 1 that the attacks fold
# into it (so far above any restart count).
LEAST_LIKELY = 1_000_011  # the clean logits that pick a targeted attack's "least_likely" target
TARGET_HIT = 1_000_013  # the logits that score a targeted attack's success (prediction == target)

# FAB (jaxrob.attacks.fab), inside the attack's key beside its run indices (run q = target rank
# index * num_restarts + restart).
FAB_TARGET = 1_000_020  # the clean logits that rank FAB-T's (and AutoAttack's APGD-T's) targets
FAB_CLEAN = 1_000_021  # the clean prediction: examples already misclassified are not attacked
FAB_SCORE = 1_000_022  # run q's final check of its point, fold_in(fold_in(key, q), FAB_SCORE)

# AutoAttack (jaxrob.attacks.autoattack), folded into example i's key k_i. Stage s of an attack
# (a restart, or a target rank) runs on fold_in(fold_in(k_i, AA_<attack>), s).
AA_CLEAN = 1_000_023  # the clean prediction (the initial robust flags)
AA_RANDOMISED = 1_000_024  # the randomness check's calls j = 0..4 (then j folded in)
AA_SCORE = 1_000_025  # the check of a stage's output: fold_in(stage key, AA_SCORE)
AA_FINAL = 1_000_026  # the final re-measure of the robust accuracy on x_adv
AA_APGD_CE = 1_000_027
AA_APGD_DLR = 1_000_028
AA_APGD_T = 1_000_029
AA_FAB = 1_000_030
AA_FAB_T = 1_000_031
AA_SQUARE = 1_000_032

# GDMP-style guided purification (jaxrob.purify.gdmp): folded into a stage's key beside
# PURIFY_FORWARD / PURIFY_REVERSE; reverse step n of the stage diffuses the guidance reference
# with normal(fold_in(fold_in(k_stage, GUIDE_REFERENCE), n)).
GUIDE_REFERENCE = 30

# DiffAttack (jaxrob.attacks.diffattack_loss): the intermediate states that carry the
# deviated-reconstruction term are drawn from fold_in(key, DIFFATTACK_STATES), key being the one
# the defended model gets (folded beside the purifier's stage indices, so far above them).
DIFFATTACK_STATES = 1_000_040

# Soundness checks (jaxrob.evaluation.soundness_checks), folded into example i's key k_i: each
# check's evaluation runs on fold_in(k_i, SOUND_<run>) and then folds the evaluation's own tags
# (ATTACK, CLEAN, ADV, FIXED) into that, exactly as evaluate_robustness does into k_i. Under
# fixed / forward_lock randomness (the key fixes the model under attack) every run uses SOUND_BASE.
SOUND_BASE = 60  # the base attack (and the re-measure of its x_adv)
SOUND_LARGE_EPS = 61  # the same attack at a large radius
SOUND_STRONGER = 62  # the attack with more iterations (and EoT samples)
SOUND_SQUARE = 63  # the gradient-free attack (Square)
SOUND_TRANSFER = 64  # the transfer attack from the bare classifier
SOUND_PROBE = 65  # the randomness probe: call j of the model gets fold_in(fold_in(k_i, 65), j)

# Protective perturbations and their edits (jaxrob.attacks.advdm / sds / mist / photoguard /
# edit_attack, jaxrob.purify.PurifyThenEdit). Inside the key k of one evaluation of a diffusion
# loss (iteration t, Monte-Carlo sample j: fold_in(fold_in(k_steps, t), j), the attacks'
# convention) the diffusion position n and the noise eps of every example are drawn from:
PROTECT_TIME = 85  # n ~ uniform over the model's schedule positions
PROTECT_NOISE = 86  # eps ~ N(0, I) shaped like the latent
# PDM-Pure before an edit (PurifyThenEdit): the purifier's and the editor's keys
PROTECT_PURIFY = 88
PROTECT_EDIT = 89
# experiments/protect_eval.py: the random direction of the same pixel norm as a protection, to
# which the encoder's amplification (latent distance / pixel distance) is compared
PROTECT_RANDOM_DIRECTION = 1_000_060
# Latent diffusion (jaxrob.models.Autoencoder, jaxrob.training.make_autoencoder_train_step, the
# latent DDPM's train step): folded into the key handed to encode_latent (or into each example's
# key of a (B,) batch of keys), or into a train step's key.
LATENT_SAMPLE = 80  # the posterior sample z = mean + std * normal(fold_in(key, 80))
VAE_TRAIN_SAMPLE = 81  # the autoencoder train step's posterior sample of the batch
LDM_TRAIN_SAMPLE = 82  # the latent DDPM train step's draw of the batch's latent codes
