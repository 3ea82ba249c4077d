"""Protective perturbations vs PDM-Pure (Xue & Chen, "Pixel is a Barrier") on MNIST.

    python experiments/protect_eval.py --config configs/mnist_protect.py \\
        --workdir runs/mnist_protect
    python experiments/protect_table.py runs/mnist_protect/results.json   # the markdown tables

For every radius of ``study.eps`` (Linf, [0, 1] pixels):

1. Protect the test images with each method of ``study.methods``: against the LDM (AdvDM(+/-),
   SDS(+/-), PhotoGuard, Mist: the attacks see the LDM's encoder ``x -> scaled latent``), and
   against the PDM (``"pdm_advdm"``: AdvDM on the pixel DDPM; ``"pdm_sdedit"``: the end-to-end
   attack through the PDM's SDEdit with exact gradients, at the radii of ``study.heavy_eps``
   only). ``"adaptive"`` (``adaptive.eps``): the protection optimised through PDM-Pure + the
   LDM edit (EoT over PDM-Pure's and the edit's noise).
2. Edit every protected set with each pipeline of ``PIPELINES``: the LDM's SDEdit (``"ldm"``),
   the PDM's SDEdit (``"pdm"``), and the LDM's SDEdit after a purification: PDM-Pure (the pixel
   DDPM at t* = 0.1 in 10 steps, ``"pdm_pure"``), JPEG (``"jpeg"``), crop-and-resize
   (``"crop"``).
3. Score each edit against the clean image's edit by the same editor (the LDM's for every LDM
   pipeline, the PDM's for ``"pdm"``; same keys, so edits differ only by their inputs): FID on
   the MNIST classifier's penultimate features (NOT Inception-FID), SSIM, PSNR, and the
   classifier's accuracy on the edited images (true labels). The ``"none"`` rows (clean inputs)
   are each pipeline's own floor.
4. The encoder's amplification: ``||E(x_p) - E(x)||_2 / ||x_p - x||_2`` per example (``E`` the
   encoder's posterior mean, scaled codes) against the same ratio for a random Gaussian
   direction of the protection's pixel norm (clipped to [0, 1], its norm measured after).

The LDM (``config.ldm.source``): ``"mnist_ldm"`` (the committed KL-autoencoder LDM export,
``checkpoints/mnist_ldm``; its diffusion runs on the SCALED latent codes, the attacks get its
``encode_fn`` / ``decode_fn``) or ``"pixel_standin"`` (the pixel DDPM behind ``z = 2x - 1``: the
LDM's interface without an encoder; smoke tests). The PDM is ``config.ddpm`` (the committed pixel
MNIST DDPM). Pixel purifiers only ever see pixels.

Per-example keys through ``run_chunks`` (resumable chunks under ``workdir/chunks``). Keys of the
run key ``k`` (each then per example, ``fold_in(., index)``): protections ``fold_in(k, 1)`` (the
same for every radius), edits and purifications ``fold_in(k, 2)`` (the edit folds 2, the
purifier 3 into the example's key: one edit key per image, the same for every method), the
adaptive attack ``fold_in(k, 4)``, the amplification's random directions ``fold_in(k, 5)``
(each example's key then folds ``jaxrob._keys.PROTECT_RANDOM_DIRECTION``).
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from absl import logging

from experiments import _common
from jaxrob._pytree import pytree_dataclass

DEFAULT_CONFIG = str(_common.REPO_ROOT / "configs" / "mnist_protect.py")
LDM_METHODS = ("advdm", "advdm-", "sds+", "sds-", "photoguard", "mist")
PDM_METHODS = ("pdm_advdm", "pdm_sdedit")
METHODS = ("none", *LDM_METHODS, *PDM_METHODS)
HEAVY_METHODS = ("pdm_sdedit",)  # run at study.heavy_eps only
PIPELINES = ("ldm", "pdm", "pdm_pure", "jpeg", "crop")
LDM_SOURCES = ("mnist_ldm", "pixel_standin")


@pytree_dataclass
class LatentEncoder:
    """``encode_fn(x) -> z``: an autoencoder's posterior mean, scaled (a pytree: its parameters
    are traced, not baked into a compilation)."""

    autoencoder: object

    def __call__(self, x):
        return self.autoencoder.encode_latent(x)


@pytree_dataclass
class LatentDecoder:
    """``decode_fn(z) -> x``: the autoencoder's decoder, unclipped (editors clip)."""

    autoencoder: object

    def __call__(self, z):
        return self.autoencoder.decode(z, clip=False)


def _standin_decode(z):
    import jaxrob.diffusion as jd

    return jd.from_model_space(z, clip=False)


def load_ldm(ldm_config, pdm):
    """``(encode_fn, decode_fn, eps_model, info)`` of ``config.ldm``."""
    import jaxrob.diffusion as jd

    source = ldm_config.source
    if source == "pixel_standin":
        return jd.to_model_space, _standin_decode, pdm, {"source": source}
    if source == "mnist_ldm":
        from jaxrob.checkpoint import read_metadata
        from jaxrob.models import load

        path = _common.resolve_path(ldm_config.path, base=_common.REPO_ROOT)
        ldm = load(path, kind="ldm", fast_vjp=True)
        ae = ldm.autoencoder
        meta = read_metadata(path)
        info = {"source": source, "path": _common.manifest_path(path), "step": meta.get("step"),
                "num_params": ldm.num_params, "latent_shape": list(ldm.latent_shape),
                "scaling_factor": float(ae.scaling_factor)}
        return LatentEncoder(ae), LatentDecoder(ae), ldm.diffusion, info
    raise ValueError(f"ldm.source: expected one of {list(LDM_SOURCES)}, got {source!r}")


def texture_target(kind: str, period: int, shape) -> np.ndarray:
    """The texture target of PhotoGuard / Mist: a checkerboard of ``period``-pixel squares."""
    if kind != "checkerboard":
        raise ValueError(f"study.target: expected 'checkerboard', got {kind!r}")
    _, h, w, c = shape
    i, j = np.meshgrid(np.arange(h) // period, np.arange(w) // period, indexing="ij")
    board = ((i + j) % 2).astype(np.float32)
    return np.broadcast_to(board[None, :, :, None], (shape[0], h, w, c)).copy()


def eps_name(eps: float) -> str:
    """``"16/255"`` for 16 / 255 (other radii: 4 decimals)."""
    k = eps * 255.0
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{eps:.4f}"


@dataclasses.dataclass(frozen=True)
class _Spec:
    """A protection's static settings (one hashable leaf: ``run_chunks`` puts plain numbers in
    its ``args`` on the devices, which would trace them)."""

    method: str
    num_steps: int
    eot_samples: int
    rate: float


def _protect(spec, models, eps, step_size, batch, keys):
    """``run_chunks``'s ``fn``: ``{"x": protected}``. ``spec`` is static; ``eps`` and
    ``step_size`` traced (one compilation per method for every radius)."""
    from jaxrob import attacks as ja

    method, num_steps, eot_samples, rate = (spec.method, spec.num_steps, spec.eot_samples,
                                            spec.rate)

    kw = dict(eps=eps, step_size=step_size, num_steps=num_steps)
    mc = dict(eot_samples=eot_samples)
    x, xt = batch["image"], batch["target"]
    ldm, enc, pdm = models["ldm"], models["encode_fn"], models["pdm"]
    if method == "none":
        return {"x": x}
    if method in ("advdm", "advdm-"):
        res = ja.advdm(ldm, x, keys, encode_fn=enc, mode="-" if method[-1] == "-" else "+",
                       **kw, **mc)
    elif method in ("sds+", "sds-"):
        res = ja.sds(ldm, x, keys, encode_fn=enc, mode=method[-1], **kw, **mc)
    elif method == "photoguard":
        res = ja.photoguard(enc, x, xt, keys, **kw)
    elif method == "mist":
        res = ja.mist(ldm, enc, x, xt, keys, rate=rate, **kw, **mc)
    elif method == "pdm_advdm":
        res = ja.advdm(pdm, x, keys, mode="+", **kw, **mc)
    elif method in ("pdm_sdedit", "adaptive"):
        res = ja.edit_attack(models["edit_fn"], x, keys, **kw, **mc)
    else:
        raise ValueError(f"study.methods: expected names in {list(METHODS)}, got {method!r}")
    return {"x": res.x_adv}


def _edit(editor, purifier, batch, keys):
    """``run_chunks``'s ``fn``: ``{"x": edit(purify(x))}`` (``purifier`` None: no purifier);
    one module-level function, so every method's edits share a compilation."""
    from jaxrob._keys import fold

    x = batch["image"]
    if purifier is not None:
        x = purifier(x, fold(keys, 3))
    return {"x": editor(x, fold(keys, 2))}


def _encode_distance(encode_fn, batch, keys):
    """``run_chunks``'s ``fn``: the latent and pixel L2 distances of the protection and of a
    random direction of the same pixel norm."""
    from jaxrob._keys import PROTECT_RANDOM_DIRECTION

    x, xp = batch["image"], batch["protected"]
    d = (xp - x).reshape(x.shape[0], -1)
    norm = jnp.linalg.norm(d, axis=1)
    g = jax.vmap(lambda k: jr.normal(jr.fold_in(k, PROTECT_RANDOM_DIRECTION),
                                     (d.shape[1],)))(keys)
    g = g / jnp.linalg.norm(g, axis=1, keepdims=True) * norm[:, None]
    xr = jnp.clip(x + g.reshape(x.shape), 0.0, 1.0)
    z, zp, zr = encode_fn(x), encode_fn(xp), encode_fn(xr)

    def dist(a, b):
        return jnp.linalg.norm((a - b).reshape(a.shape[0], -1), axis=1)

    return {"pixel": norm, "latent": dist(zp, z), "pixel_random": dist(xr, x),
            "latent_random": dist(zr, z)}


def _amplification(rec) -> dict:
    """Means of the per-example ratios latent / pixel distance (examples the protection moved)."""
    ok = rec["pixel"] > 1e-8
    if not ok.any():
        return {"ratio": None, "ratio_random": None, "amplification": None,
                "pixel_l2": 0.0, "latent_l2": 0.0}
    r = rec["latent"][ok] / rec["pixel"][ok]
    rr = rec["latent_random"][ok] / np.maximum(rec["pixel_random"][ok], 1e-12)
    return {"ratio": float(r.mean()), "ratio_random": float(rr.mean()),
            "amplification": float(r.mean() / rr.mean()),
            "pixel_l2": float(rec["pixel"].mean()), "latent_l2": float(rec["latent"].mean()),
            "latent_l2_random": float(rec["latent_random"].mean())}


@jax.jit
def _predict(clf, x):
    return jnp.argmax(clf(x), -1)


def _accuracy(clf, x, labels, batch_size) -> float:
    pred = np.concatenate([np.asarray(_predict(clf, jnp.asarray(x[i:i + batch_size])))
                           for i in range(0, len(x), batch_size)])
    return float((pred == labels).mean())


def save_grids(path, rows) -> None:
    """One PNG of labelled rows of images (``rows``: ``[(label, (n, H, W, C) in [0, 1])]``)."""
    from PIL import Image, ImageDraw

    scale, pad, label_w = 2, 2, 110
    h, w = rows[0][1].shape[1:3]
    n = max(len(r[1]) for r in rows)
    cw, ch = w * scale + pad, h * scale + pad
    canvas = Image.new("L", (label_w + n * cw + pad, len(rows) * ch + pad), 255)
    draw = ImageDraw.Draw(canvas)
    for r, (label, imgs) in enumerate(rows):
        y = pad + r * ch
        draw.text((4, y + ch // 2 - 6), label, fill=0)
        for i, img in enumerate(np.clip(np.asarray(imgs, np.float32), 0, 1)):
            tile = Image.fromarray((img[..., 0] * 255 + 0.5).astype(np.uint8))
            canvas.paste(tile.resize((w * scale, h * scale), Image.NEAREST),
                         (label_w + i * cw, y))
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)


def run(config, workdir) -> dict:
    """The study; returns (and writes) ``results.json``'s content."""
    import jaxrob.purify as jp
    from jaxrob.evaluation import ChunkStore, classifier_features, edit_quality, run_chunks

    timer, workdir, mesh = _common.begin(config, workdir)
    batch_size = _common.check_batch_size(config.batch_size, mesh, "batch_size")
    test = _common.load_split(config.data, config.data.test_split,
                              num_images=int(config.data.num_images))
    p, e, q, a = config.study, config.edit, config.purify, config.adaptive
    methods = tuple(p.methods)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"study.methods: expected names in {list(METHODS)}, got {m!r}")
    eps_list = [_common_eps(v, "study.eps") for v in p.eps]
    heavy_eps = [_common_eps(v, "study.heavy_eps") for v in p.heavy_eps]
    adaptive_eps = [_common_eps(v, "adaptive.eps") for v in a.eps] if a.enabled else []
    pdm, pdm_info = _common.load_ddpm(config.ddpm, tuple(test.image_shape), fast_vjp=True)
    encode_fn, decode_fn, ldm, ldm_info = load_ldm(config.ldm, pdm)
    clf, clf_info = _common.load_classifier(config.classifier, config.data)
    features = classifier_features(clf)
    edit_kw = dict(strength=float(e.strength), steps=int(e.steps), sampler=str(e.sampler))
    ldm_editor = jp.sdeditor(ldm, encode_fn=encode_fn, decode_fn=decode_fn, **edit_kw)
    pdm_editor = jp.sdeditor(pdm, **edit_kw)  # the PDM's own edit (pixels)
    pure = _common.make_purifier(config.purifier, pdm)  # PDM-Pure: SDEdit with the PDM
    if pure is None:
        raise ValueError("purifier: PDM-Pure needs config.purifier.enabled = True")
    key = jr.key(int(config.seed))
    images = np.asarray(test.images, np.float32)
    labels = np.asarray(test.labels)
    data = {"index": np.asarray(test.indices), "image": images,
            "target": texture_target(str(p.target), int(p.target_period), images.shape)}

    fingerprint = {f: _common.to_plain(config[f]) for f in
                   ("seed", "data", "ddpm", "ldm", "classifier", "purifier", "edit", "study",
                    "purify", "adaptive")}

    def chunks(fn, d, k, args, name):
        store = ChunkStore(workdir / "chunks" / name, fingerprint={**fingerprint, "part": name})
        return run_chunks(fn, d, key=k, args=args, batch_size=batch_size, mesh=mesh,
                          store=store, desc=name).records

    # the (method, eps) sets (a run stopped early has its results.json for every finished set)
    base_models = {"ldm": ldm, "encode_fn": encode_fn, "pdm": pdm, "edit_fn": None}
    pipeline = jp.PurifyThenEdit(pure, ldm_editor)
    jobs = [("none", 0.0, None, 0, 0, None)]
    for r in eps_list:
        for m in methods:
            if m == "none" or (m in HEAVY_METHODS and not _has(heavy_eps, r)):
                continue
            models = {**base_models, "edit_fn": pdm_editor if m == "pdm_sdedit" else None}
            steps = int(p.heavy_num_steps) if m in HEAVY_METHODS else int(p.num_steps)
            jobs.append((m, r, models, steps, int(p.eot_samples), jr.fold_in(key, 1)))
        if _has(adaptive_eps, r):
            jobs.append(("adaptive", r, {**base_models, "edit_fn": pipeline},
                         int(a.num_steps), int(a.eot_samples), jr.fold_in(key, 4)))
    # priority: everything at the first radius, then the cheap methods at the others, then the
    # expensive end-to-end attacks at the others
    first = eps_list[0] if eps_list else None
    jobs.sort(key=lambda j: 0 if j[0] == "none" or j[1] == first
              else (2 if j[0] in (*HEAVY_METHODS, "adaptive") else 1))
    for pipe in q.pipelines:
        if pipe not in PIPELINES:
            raise ValueError(f"purify.pipelines: expected names in {list(PIPELINES)}, got "
                             f"{pipe!r}")
    if "ldm" not in q.pipelines or "pdm" not in q.pipelines:
        raise ValueError("purify.pipelines: expected 'ldm' and 'pdm' (the references)")

    protected, edits, rows, amplification, grids = {}, {}, [], [], []
    results = {}
    clean_acc = _accuracy(clf, images, labels, batch_size)

    def write():
        _common.save_npz(workdir / "protected.npz",
                         **{f"{m}_eps{r * 255:.0f}": v for (m, r), v in protected.items()})
        results.update({
            "rows": rows, "amplification": amplification, "clean_accuracy": clean_acc,
            "pdm": pdm_info, "ldm": ldm_info, "classifier": clf_info,
            "ldm_editor": ldm_editor.manifest(), "pdm_editor": pdm_editor.manifest(),
            "pdm_pure": pure.manifest(), "study": _common.to_plain(p),
            "adaptive": _common.to_plain(a), "grids": grids,
            "fid_features": "MNIST classifier penultimate features (not Inception-FID)",
            "num_images": len(test), "sets_done": len(protected), "sets_total": len(jobs),
            "complete": len(protected) == len(jobs), "wall_s": timer()})
        _common.write_results(config, workdir, results, test)

    for m, r, models, steps, eot, k in jobs:
        t0 = timer()
        tag = "clean" if m == "none" else f"{m}_eps{r * 255:.0f}"
        # 1. the protection
        if m == "none":
            x_m = images
        else:
            step = jnp.asarray(r * float(p.step_ratio), jnp.float32)
            rec = chunks(_protect, data, k, (_Spec(m, steps, eot, float(p.rate)), models,
                                             jnp.asarray(r, jnp.float32), step),
                         f"protect_{tag}")
            x_m = np.asarray(rec["x"], np.float32)
        protected[(m, r)] = x_m
        # 2. its edits by every pipeline
        for pipe in q.pipelines:
            x_in, editor, purifier = x_m, ldm_editor, None
            if pipe == "pdm":
                editor = pdm_editor
            elif pipe == "pdm_pure":
                purifier = pure
            elif pipe == "jpeg":
                x_in = jp.jpeg(jnp.asarray(x_m), quality=int(q.jpeg_quality))
            elif pipe == "crop":
                x_in = np.asarray(jp.crop_resize(jnp.asarray(x_m), crop=float(q.crop)))
            d = {"index": data["index"], "image": np.asarray(x_in, np.float32)}
            edits[(m, r, pipe)] = np.asarray(
                chunks(_edit, d, jr.fold_in(key, 2), (editor, purifier),
                       f"edit_{tag}_{pipe}")["x"], np.float32)
        # 3. scores against the clean image's edit by the same editor
        for pipe in q.pipelines:
            ref = edits[("none", 0.0, "pdm" if pipe == "pdm" else "ldm")]
            row = {"method": m, "eps": r, "eps_name": "0" if m == "none" else eps_name(r),
                   "pipeline": pipe, "linf": float(np.abs(x_m - images).max())}
            qd = edit_quality(jnp.asarray(edits[(m, r, pipe)]), jnp.asarray(ref),
                              feature_fn=features)
            row.update({kk: v for kk, v in qd.items() if not kk.endswith("per_example")})
            row["accuracy"] = _accuracy(clf, edits[(m, r, pipe)], labels, batch_size)
            rows.append(row)
        # 4. the encoder's amplification
        if m != "none":
            d = {"index": data["index"], "image": images, "protected": x_m}
            rec = chunks(_encode_distance, d, jr.fold_in(key, 5), (encode_fn,),
                         f"amplify_{tag}")
            amplification.append({"method": m, "eps": r, "eps_name": eps_name(r),
                                  **_amplification({kk: np.asarray(v, np.float64)
                                                    for kk, v in rec.items()})})
        g = config.grids
        if g.enabled and m != "none" and _has(g.eps, r):
            n = int(g.num_images)
            path = _common.resolve_path(str(g.directory), base=_common.REPO_ROOT) / \
                f"protect_{tag}.png"
            save_grids(path, [("clean", images[:n]), (f"{m} {eps_name(r)}", x_m[:n]),
                              ("LDM edit", edits[(m, r, "ldm")][:n]),
                              ("PDM edit", edits[(m, r, "pdm")][:n]),
                              ("PDM-Pure+LDM", edits[(m, r, "pdm_pure")][:n]),
                              ("clean LDM edit", edits[("none", 0.0, "ldm")][:n])])
            grids.append(str(path.relative_to(_common.REPO_ROOT)) if path.is_relative_to(
                _common.REPO_ROOT) else str(path))
        write()
        logging.info("%s: done in %.0f s (%d of %d sets, %.0f s so far)", tag, timer() - t0,
                     len(protected), len(jobs), timer())
    logging.info("done in %.0f s: %d rows", timer(), len(rows))
    return results


def _has(values, r) -> bool:
    return any(abs(float(v) - r) < 1e-9 for v in values)


def _common_eps(value, name: str) -> float:
    v = float(value)
    if not v > 0:
        raise ValueError(f"{name}: expected radii > 0, got {value!r}")
    return v


if __name__ == "__main__":
    _common.cli(run, DEFAULT_CONFIG)
