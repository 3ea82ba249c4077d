"""The project's main job, on the bundled 8x8 digits (no download, no data dir needed).

    python experiments/main.py --workdir runs/main          # (--config defaults to this file)

Trains the digits DDPM (``digits_ddpm.py``) and the digits classifier
(``digits_classifier.py``) unless their exports already exist under ``checkpoints/digits_ddpm``
and ``checkpoints/digits_classifier`` (then they are loaded), and writes a sample grid, the
denoising MSE at t* = 0.1 / 0.3 and the classifier's test accuracy (clean, and on the one-step
denoised test images) into ``workdir/results.json``, then runs the robust evaluation of
``digits_robust.py`` on the two models (``workdir/robust/``: PGD-EoT with exact gradients,
BPDA and fixed randomness against DDPM purification, one-shot and worst-of-10). With the exports present it takes
~1 minute; training both from scratch takes ~7-8 minutes on the 2-core CPU.
Smoke variant (tiny models, exports under the workdir): ``--config configs/main.py:smoke``.
"""

from ml_collections import config_dict

from configs import _common, digits_classifier, digits_ddpm, digits_robust


def get_config(arg=None):
    arg = _common.parse_arg(arg)
    c = config_dict.ConfigDict()
    c.seed = 0
    c.ddpm = digits_ddpm.get_config(arg)
    c.classifier = digits_classifier.get_config(arg)
    # where the exports live; relative paths are relative to the repository root; "" = the
    # workdir (used by the smoke test, so it never touches the committed exports)
    c.checkpoints_dir = "checkpoints" if not arg else ""
    c.sample = c.ddpm.sample.copy_and_resolve_references()
    c.eval = config_dict.ConfigDict({"t_stars": (0.1, 0.3), "num_images": 0, "batch_size": 500,
                                     "seed": 2})
    c.mesh = _common.mesh(cpu_ynn="no_conv")  # not "off": docs/known_faults.md
    # a small robust evaluation of the two models (configs/digits_robust.py; its model paths
    # are replaced by the exports above)
    c.robust = digits_robust.get_config(arg)
    if arg == "smoke":
        c.eval.update(num_images=16, batch_size=16)
        # the robust path end to end; the purifier rows are exercised by the robust smoke test
        c.robust.rows = tuple(r for r in c.robust.rows if r["name"] == "classifier")
    return c
