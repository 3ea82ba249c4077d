"""Robust accuracy of purifier + classifier under a named protocol; resumable sharded runs."""

from jaxrob.evaluation._protocols import PROTOCOLS as PROTOCOLS
from jaxrob.evaluation._protocols import RANDOMNESS as RANDOMNESS
from jaxrob.evaluation._protocols import check_randomness as check_randomness
from jaxrob.evaluation._protocols import mean_interval as mean_interval
from jaxrob.evaluation._protocols import parse_protocol as parse_protocol
from jaxrob.evaluation._protocols import predictions as predictions
from jaxrob.evaluation._protocols import protocol_scores as protocol_scores
from jaxrob.evaluation._protocols import sample_keys as sample_keys
from jaxrob.evaluation._protocols import score_predictions as score_predictions
from jaxrob.evaluation._protocols import summarize as summarize
from jaxrob.evaluation._protocols import wilson_interval as wilson_interval
from jaxrob.evaluation._robust import attack_manifest as attack_manifest
from jaxrob.evaluation._robust import evaluate_robustness as evaluate_robustness
from jaxrob.evaluation._robust import fixed_purifier_keys as fixed_purifier_keys
from jaxrob.evaluation._robust import robust_scores as robust_scores
from jaxrob.evaluation._robust import score_record as score_record
from jaxrob.evaluation._store import ChunkStore as ChunkStore
