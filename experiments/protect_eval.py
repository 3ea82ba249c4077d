"""Protective perturbations vs PDM-Pure (Xue & Chen, "Pixel is a Barrier"): a skeleton study.

    python experiments/protect_eval.py --config configs/mnist_protect.py \\
        --workdir runs/mnist_protect

1. Protect every test image with each method of ``study.methods`` against the LDM (AdvDM(+/-),
   SDS(+/-), PhotoGuard, Mist; ``"none"`` is the clean image).
2. Purify each protected set (``purify.methods``: ``"none"``, PDM-Pure with the pixel DDPM,
   ``config.purifier``, JPEG, crop-and-resize) and edit it with the LDM's SDEdit.
3. Score each edit against the edit of the clean image (same keys): FID on the classifier's
   penultimate features (not Inception-FID), SSIM and PSNR (``jaxrob.evaluation.edit_quality``).
4. The adaptive attack (``adaptive.enabled``): protections optimised through PDM-Pure + the LDM
   edit with exact gradients (``jaxrob.attacks.edit_attack`` on ``PurifyThenEdit``), scored
   the same way after PDM-Pure.

Per-example keys through ``run_chunks`` (resumable chunks under ``workdir/chunks``). Keys of the
run key ``k`` (each then per example, ``fold_in(., index)``): protections ``fold_in(k, 1)``,
edits and purifications ``fold_in(k, 2)`` (the edit folds 2, the purifier 3 into the example's
key: one edit key per image, the same for every method, so edits differ only by their inputs),
the adaptive attack ``fold_in(k, 4)``.

The LDM is read from ``config.ldm``; only ``"pixel_standin"`` exists yet (the pixel DDPM behind
``z = 2x - 1``), so the numbers of this skeleton are not the paper's LDM results.
"""

from __future__ import annotations

import pathlib
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax.numpy as jnp
import jax.random as jr
import numpy as np
from absl import logging

from experiments import _common

DEFAULT_CONFIG = str(_common.REPO_ROOT / "configs" / "mnist_protect.py")
METHODS = ("none", "advdm", "advdm-", "sds+", "sds-", "photoguard", "mist")
PURIFICATIONS = ("none", "pdm_pure", "jpeg", "crop_resize")
LDM_SOURCES = ("pixel_standin",)


def load_ldm(ldm_config, pdm):
    """``(encode_fn, decode_fn, eps_model, info)`` of ``config.ldm``."""
    import jaxrob.diffusion as jd

    source = ldm_config.source
    if source == "pixel_standin":
        decode = lambda z: jd.from_model_space(z, clip=False)
        return jd.to_model_space, decode, pdm, {"source": source}
    raise ValueError(f"ldm.source: expected one of {list(LDM_SOURCES)} (the KL-autoencoder LDM "
                     f"is not wired in yet), got {source!r}")


def texture_target(kind: str, period: int, shape) -> np.ndarray:
    """The texture target of PhotoGuard / Mist: a checkerboard of ``period``-pixel squares."""
    if kind != "checkerboard":
        raise ValueError(f"study.target: expected 'checkerboard', got {kind!r}")
    _, h, w, c = shape
    i, j = np.meshgrid(np.arange(h) // period, np.arange(w) // period, indexing="ij")
    board = ((i + j) % 2).astype(np.float32)
    return np.broadcast_to(board[None, :, :, None], (shape[0], h, w, c)).copy()


def _protect_fn(method, p, encode_fn):
    """``fn(ldm_eps, batch, keys) -> {"x": protected}`` for ``run_chunks``."""
    from jaxrob import attacks as ja

    kw = dict(eps=float(p.eps), step_size=float(p.step_size), num_steps=int(p.num_steps))
    mc = dict(eot_samples=int(p.eot_samples))
    if method not in METHODS:
        raise ValueError(f"study.methods: expected names in {list(METHODS)}, got {method!r}")

    def fn(ldm, batch, keys):
        x, xt = batch["image"], batch["target"]
        if method == "none":
            return {"x": x}
        if method in ("advdm", "advdm-"):
            res = ja.advdm(ldm, x, keys, encode_fn=encode_fn, mode="-" if method[-1] == "-"
                           else "+", **kw, **mc)
        elif method in ("sds+", "sds-"):
            res = ja.sds(ldm, x, keys, encode_fn=encode_fn, mode=method[-1], **kw, **mc)
        elif method == "photoguard":
            res = ja.photoguard(encode_fn, x, xt, keys, **kw)
        else:
            res = ja.mist(ldm, encode_fn, x, xt, keys, rate=float(p.rate), **kw, **mc)
        return {"x": res.x_adv}

    return fn


def _edit(editor, purifier, batch, keys):
    """``run_chunks``'s ``fn``: ``{"x": edit(purify(x))}`` (``purifier`` None: no purifier);
    one module-level function, so every method's edits share a compilation."""
    from jaxrob._keys import fold

    x = batch["image"]
    if purifier is not None:
        x = purifier(x, fold(keys, 3))
    return {"x": editor(x, fold(keys, 2))}


def run(config, workdir) -> dict:
    """The study; returns (and writes) ``results.json``'s content."""
    import jaxrob.purify as jp
    from jaxrob.attacks import edit_attack
    from jaxrob.evaluation import ChunkStore, classifier_features, edit_quality, run_chunks

    timer, workdir, mesh = _common.begin(config, workdir)
    batch_size = _common.check_batch_size(config.batch_size, mesh, "batch_size")
    test = _common.load_split(config.data, config.data.test_split,
                              num_images=int(config.data.num_images))
    pdm, pdm_info = _common.load_ddpm(config.ddpm, tuple(test.image_shape), fast_vjp=True)
    encode_fn, decode_fn, ldm, ldm_info = load_ldm(config.ldm, pdm)
    clf, clf_info = _common.load_classifier(config.classifier, config.data)
    features = classifier_features(clf)
    p, e, q = config.study, config.edit, config.purify
    editor = jp.sdeditor(ldm, strength=float(e.strength), steps=int(e.steps),
                         sampler=str(e.sampler), encode_fn=encode_fn, decode_fn=decode_fn)
    pure = _common.make_purifier(config.purifier, pdm)  # PDM-Pure: SDEdit with the PDM
    if pure is None:
        raise ValueError("purifier: PDM-Pure needs config.purifier.enabled = True")
    key = jr.key(int(config.seed))
    images = np.asarray(test.images, np.float32)
    data = {"index": np.asarray(test.indices), "image": images,
            "target": texture_target(str(p.target), int(p.target_period), images.shape)}

    fingerprint = {f: _common.to_plain(config[f]) for f in
                   ("seed", "data", "ddpm", "ldm", "classifier", "study", "purifier", "edit",
                    "purify", "adaptive")}

    def chunks(fn, d, k, args, name):
        store = ChunkStore(workdir / "chunks" / name, fingerprint={**fingerprint, "part": name})
        return run_chunks(fn, d, key=k, args=args, batch_size=batch_size, mesh=mesh,
                          store=store, desc=name).records["x"]

    protected = {m: chunks(_protect_fn(m, p, encode_fn), data, jr.fold_in(key, 1), (ldm,),
                           f"protect_{m}") for m in p.methods}
    edits, table = {}, {}
    for m, x_m in protected.items():
        for pur in q.methods:
            x_in = x_m
            purifier = None
            if pur == "pdm_pure":
                purifier = pure
            elif pur == "jpeg":
                x_in = jp.jpeg(jnp.asarray(x_m), quality=int(q.jpeg_quality))
            elif pur == "crop_resize":
                x_in = np.asarray(jp.crop_resize(jnp.asarray(x_m), crop=float(q.crop)))
            elif pur != "none":
                raise ValueError(f"purify.methods: expected names in {list(PURIFICATIONS)}, "
                                 f"got {pur!r}")
            d = {"index": data["index"], "image": np.asarray(x_in, np.float32)}
            edits[(m, pur)] = chunks(_edit, d, jr.fold_in(key, 2),
                                     (editor, purifier), f"edit_{m}_{pur}")
    ref = jnp.asarray(edits[("none", "none")]) if ("none", "none") in edits else None
    for (m, pur), x_edit in edits.items():
        linf = float(np.abs(protected[m] - images).max())
        row = {"method": m, "purification": pur, "linf": linf}
        if ref is not None:
            row.update({k: v for k, v in edit_quality(jnp.asarray(x_edit), ref,
                                                      feature_fn=features).items()
                        if not k.endswith("per_example")})
        table[f"{m}/{pur}"] = row
    adaptive = None
    a = config.adaptive
    if a.enabled:
        pipeline = jp.PurifyThenEdit(pure, editor)

        def attack_fn(pipeline, batch, keys):
            x = batch["image"]
            xt = batch["target"] if a.targeted else None
            return {"x": edit_attack(pipeline, x, keys, x_target=xt, eps=float(p.eps),
                                     step_size=float(p.step_size), num_steps=int(a.num_steps),
                                     eot_samples=int(a.eot_samples)).x_adv}

        x_ad = chunks(attack_fn, data, jr.fold_in(key, 4), (pipeline,), "adaptive")
        d = {"index": data["index"], "image": x_ad}
        x_edit = chunks(_edit, d, jr.fold_in(key, 2), (editor, pure),
                        "edit_adaptive_pdm_pure")
        adaptive = {"linf": float(np.abs(x_ad - images).max())}
        if ref is not None:
            adaptive.update({k: v for k, v in edit_quality(jnp.asarray(x_edit), ref,
                                                           feature_fn=features).items()
                             if not k.endswith("per_example")})
    _common.save_npz(workdir / "protected.npz", **{m: v for m, v in protected.items()})
    results = {"table": table, "adaptive": adaptive, "pdm": pdm_info, "ldm": ldm_info,
               "classifier": clf_info, "editor": editor.manifest(),
               "pdm_pure": pure.manifest(), "fid_features": "classifier penultimate (not "
               "Inception)", "num_images": len(test), "wall_s": timer()}
    _common.write_results(config, workdir, results, test)
    logging.info("edit quality: %s", {k: (round(v.get("ssim", np.nan), 3),
                                          round(v.get("fid") or np.nan, 3))
                                      for k, v in table.items()})
    return results


if __name__ == "__main__":
    _common.cli(run, DEFAULT_CONFIG)
