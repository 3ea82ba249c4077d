"""Robust accuracy of a defended model under a named protocol; the resumable chunk runner.

Public: :func:`evaluate_robustness` (attack + scoring over a dataset, resumable and sharded),
:func:`robust_scores` (one batch, jit-able), attack detection from per-example scores
(:func:`roc_curve`, :func:`roc_auc`, :func:`detection_rate`), the protocols
(:func:`score_predictions`, :func:`predictions`, :func:`parse_protocol`, intervals,
:func:`fixed_aa_score`, ADDT's Fixed-AutoAttack minimum over candidates), the randomness modes
(:data:`RANDOMNESS`: ``stochastic``, ``fixed``, ``forward_lock``),
:func:`fixed_purifier_keys` (the keys of ``randomness="fixed"``, and the forward-noise keys of
``"forward_lock"``), and :func:`run_chunks` /
:class:`ChunkStore`, the one chunk runner that every per-example computation of the library and
the experiments goes through; :func:`score_adversarial` scores adversarial inputs computed
elsewhere (AutoAttack's host loop) exactly as :func:`evaluate_robustness` scores its own;
:func:`soundness_checks` runs the soundness checks of an evaluation (large eps, more
iterations, gradient-free and transfer attacks, AutoAttack's flags) with verdicts
(:data:`CHECKS`, :data:`VERDICTS`).

Edit quality (protective perturbations, PDM-Pure): :func:`fid` / :func:`frechet_distance` (the
FID formula on a given feature function, e.g. :func:`classifier_features`, the penultimate
features of our MNIST classifier; not Inception-FID), :func:`psnr`, and :func:`edit_quality`
(mean SSIM, PSNR and FID of edits against references).
"""

from jaxrob.evaluation._detection import Detection as Detection
from jaxrob.evaluation._detection import detection_rate as detection_rate
from jaxrob.evaluation._detection import roc_auc as roc_auc
from jaxrob.evaluation._detection import roc_curve as roc_curve
from jaxrob.evaluation._edit_quality import classifier_features as classifier_features
from jaxrob.evaluation._edit_quality import edit_quality as edit_quality
from jaxrob.evaluation._edit_quality import fid as fid
from jaxrob.evaluation._edit_quality import frechet_distance as frechet_distance
from jaxrob.evaluation._edit_quality import psnr as psnr
from jaxrob.evaluation._given import score_adversarial as score_adversarial
from jaxrob.evaluation._protocols import PROTOCOLS as PROTOCOLS
from jaxrob.evaluation._protocols import RANDOMNESS as RANDOMNESS
from jaxrob.evaluation._protocols import check_randomness as check_randomness
from jaxrob.evaluation._protocols import fixed_aa_score as fixed_aa_score
from jaxrob.evaluation._protocols import mean_interval as mean_interval
from jaxrob.evaluation._protocols import parse_protocol as parse_protocol
from jaxrob.evaluation._protocols import predictions as predictions
from jaxrob.evaluation._protocols import protocol_scores as protocol_scores
from jaxrob.evaluation._protocols import score_predictions as score_predictions
from jaxrob.evaluation._protocols import summarize as summarize
from jaxrob.evaluation._protocols import wilson_interval as wilson_interval
from jaxrob.evaluation._robust import attack_nfe as attack_nfe
from jaxrob.evaluation._robust import evaluate_robustness as evaluate_robustness
from jaxrob.evaluation._robust import fixed_purifier_keys as fixed_purifier_keys
from jaxrob.evaluation._robust import robust_scores as robust_scores
from jaxrob.evaluation._robust import score_record as score_record
from jaxrob.evaluation._runner import ChunkRun as ChunkRun
from jaxrob.evaluation._runner import run_chunks as run_chunks
from jaxrob.evaluation._soundness import CHECKS as CHECKS
from jaxrob.evaluation._soundness import SOUNDNESS_ATTACKS as SOUNDNESS_ATTACKS
from jaxrob.evaluation._soundness import VERDICTS as VERDICTS
from jaxrob.evaluation._soundness import soundness_checks as soundness_checks
from jaxrob.evaluation._store import ChunkStore as ChunkStore
