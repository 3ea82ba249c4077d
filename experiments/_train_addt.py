"""The implementation behind ``experiments/train_addt.py`` (its docstring says what the run does);
a private module, so other entry points and notebooks can share it without importing an entry
point.

The library has the ADDT step (:func:`jaxrob.training.make_addt_train_step`); this module turns
a config into it: the base DDPM export and the frozen classifier export (checked against the
data before anything runs), the variant's options, the resumable sharded train loop, the export
with its provenance, and a small before/after evaluation.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from absl import logging

from experiments import _common

# config.addt.variant -> the ``mapping`` of jaxrob.training.cgpo_delta
VARIANTS = {"addt": "rbgm", "no_rbgm": "pgd_linf", "no_cgpo": "gaussian"}

# Compiled train steps by everything that shapes their program (see _train_step): rerunning a
# config in the same process (a notebook cell, a resumed run, the tests) does not recompile.
_STEPS: OrderedDict[str, tuple] = OrderedDict()
_MAX_STEPS_CACHED = 4


# ----------------------------------------------------------------------------- checks


def addt_options(config) -> dict:
    """The ADDT keyword arguments of ``make_addt_train_step`` from ``config.addt``, checked.

    Raises:
      ValueError: naming the config field, for an unknown variant, a negative or non-integer
        ``num_iters``, ``lambda_min > lambda_max`` or a ratio bound outside [0, 1].
    """
    from jaxrob.training import addt_ratio

    a = config.addt
    if a.variant not in VARIANTS:
        raise ValueError(f"addt.variant: expected one of {list(VARIANTS)}, got {a.variant!r}")
    k = a.num_iters
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
        raise ValueError(f"addt.num_iters: expected a non-negative integer (the number K of "
                         f"CGPO iterations), got {k!r}")
    if float(a.lambda_min) > float(a.lambda_max):
        raise ValueError(f"addt.lambda_min, addt.lambda_max: expected lambda_min <= "
                         f"lambda_max, got lambda_min={a.lambda_min!r} > "
                         f"lambda_max={a.lambda_max!r}")
    ratio = dict(lambda_unit=float(a.lambda_unit), lambda_min=float(a.lambda_min),
                 lambda_max=float(a.lambda_max))
    try:
        addt_ratio(0.5, **ratio)  # the library's range checks, before anything is loaded
    except ValueError as e:
        raise ValueError(f"addt.{e}") from None
    mapping = VARIANTS[a.variant]
    # no_cgpo draws delta ~ N(0, I) whatever K is; record the K it runs with
    return dict(mapping=mapping, num_iters=0 if mapping == "gaussian" else int(k), **ratio,
                clip_x0=bool(a.clip_x0), share_noise=bool(a.share_noise),
                linf_eps=float(a.linf_eps), linf_step=float(a.linf_step),
                linf_ratio_max=float(a.linf_ratio_max))


def _export_meta(path, kind: str, field: str) -> dict:
    from jaxrob.checkpoint import read_metadata

    meta = read_metadata(path)
    if meta.get("kind") != kind:
        raise ValueError(f"{field}: {path} holds a {meta.get('kind')!r} export, expected a "
                         f"{kind!r} export")
    return meta


def _image_shape(meta) -> tuple | None:
    shape = (meta.get("data") or {}).get("image_shape")
    return tuple(int(s) for s in shape) if shape is not None else None


def check_exports(config, train_ds) -> tuple[dict, dict]:
    """Read (not load) the two exports' metadata and check them against the data.

    Returns:
      ``(ddpm_info, classifier_info)``: path, metadata and parameter checksum of each.

    Raises:
      ValueError: the DDPM export is not a DDPM or was trained on images of another shape than
        the data's; the classifier export is not a classifier, takes images of another shape,
        or has another number of classes than the data's labels.
    """
    from jaxrob.checkpoint import export_checksum

    image_shape = tuple(int(s) for s in train_ds.image_shape)
    what = f"the data ({train_ds.name} {train_ds.split})"
    ddpm_path = _common.resolve_path(config.ddpm.path, base=_common.REPO_ROOT)
    ddpm_meta = _export_meta(ddpm_path, "ddpm", "ddpm.path")
    shape = _image_shape(ddpm_meta)
    if shape != image_shape:
        raise ValueError(f"ddpm.path: the DDPM export {ddpm_path} was trained on images of "
                         f"shape {shape}; expected {image_shape}, the image shape of {what}")
    clf_path = _common.resolve_path(config.classifier.path, base=_common.REPO_ROOT)
    clf_meta = _export_meta(clf_path, "classifier", "classifier.path")
    shape = _image_shape(clf_meta)
    if shape is not None and shape != image_shape:
        raise ValueError(f"classifier.path: the classifier export {clf_path} takes images of "
                         f"shape {shape}; expected {image_shape}, the image shape of {what}")
    num_classes = clf_meta.get("num_classes")
    labels = np.asarray(train_ds.labels)
    if num_classes != train_ds.num_classes or (labels.size and int(labels.max()) >= num_classes):
        raise ValueError(f"classifier.path: the classifier export {clf_path} has "
                         f"{num_classes} classes; expected {train_ds.num_classes}, the number "
                         f"of classes of {what} (labels {int(labels.min())}.."
                         f"{int(labels.max())})")
    return ({"path": str(ddpm_path), "meta": ddpm_meta, "checksum": export_checksum(ddpm_path)},
            {"path": str(clf_path), "meta": clf_meta, "checksum": export_checksum(clf_path)})


def model_metadata(config, ddpm_meta) -> dict:
    """The fine-tune's ``model`` metadata: the base export's, with ``ddpm.dropout`` applied."""
    model = json.loads(json.dumps(ddpm_meta["model"]))
    if config.ddpm.get("dropout") is not None:
        dropout = float(config.ddpm.dropout)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"ddpm.dropout: expected a value in [0, 1) or None, got {dropout}")
        model.setdefault("overrides", {})["dropout"] = dropout
    return model


def optimizer_options(config, num_steps: int) -> dict:
    tc = config.train
    return dict(learning_rate=float(tc.learning_rate), b1=float(tc.b1), b2=float(tc.b2),
                eps=float(tc.eps), weight_decay=float(tc.weight_decay),
                grad_clip=None if tc.grad_clip is None else float(tc.grad_clip),
                warmup_steps=int(tc.warmup_steps), lr_schedule=tc.lr_schedule,
                total_steps=int(num_steps), decay_all=bool(tc.decay_all))


def ema_options(config) -> dict:
    tc = config.train
    return dict(ema_decay=None if tc.ema_decay is None else float(tc.ema_decay),
                ema_warmup=bool(tc.ema_warmup),
                ema_power=None if tc.ema_power is None else float(tc.ema_power))


def fingerprint(config, ddpm_info, clf_info, options, model_meta) -> dict:
    """What a checkpoint must agree with to be resumed: the exact base and classifier exports
    (their parameter checksums), the network, the variant's options, the optimizer and EMA,
    the data and the seed."""
    tc = config.train
    return {"kind": "addt", "ddpm": {"checksum": ddpm_info["checksum"], "model": model_meta,
                                     "diffusion": ddpm_info["meta"]["diffusion"]},
            "classifier": {"checksum": clf_info["checksum"]},
            "addt": options,
            "optimizer": {k: v for k, v in optimizer_options(config, 1).items()
                          if k != "total_steps"},
            "ema": ema_options(config), "batch_size": int(tc.batch_size),
            "seed": int(config.seed),
            "data": {"name": config.data.name, "train_split": config.data.train_split}}


# ----------------------------------------------------------------------------- training


def _train_step(module, schedule, classifier, *, options, optimizer, ema, mesh,
                cache_key: str):
    """``(train_step, tx, lr_fn)``, built once per ``cache_key`` (the JSON of everything the
    compiled program depends on: network and schedule metadata, the classifier's checksum,
    options, optimizer, EMA, mesh devices)."""
    from jaxrob.training import make_addt_optimizer, make_addt_train_step

    if cache_key in _STEPS:
        _STEPS.move_to_end(cache_key)
        return _STEPS[cache_key]
    tx, lr_fn = make_addt_optimizer(**optimizer)
    step = make_addt_train_step(module.apply, tx, schedule, classifier, **options, **ema,
                                lr_fn=lr_fn, mesh=mesh)
    _STEPS[cache_key] = (step, tx, lr_fn)
    while len(_STEPS) > _MAX_STEPS_CACHED:
        _STEPS.popitem(last=False)
    return _STEPS[cache_key]


def batch_stream(train_ds, batch_size: int, seed: int):
    """``batches(start_step)`` for ``train_loop``: images and labels, batch ``i`` a function of
    ``(seed, i)`` only (so a resumed run sees the same batches)."""
    from jaxrob.training import step_batches

    return lambda start: step_batches(train_ds, batch_size, seed=seed, start_step=start,
                                      keys=("image", "label"))


# ----------------------------------------------------------------------------- evaluation


def _eval_chunk(model, classifier, batch, keys):
    """Per example: at each of the batch's schedule positions, the eps-MSE, the x0-MSE of the
    one-step estimate and whether the classifier labels that estimate correctly."""
    import jaxrob.diffusion as jd
    from jaxrob.training import normal_noise

    x01, labels, n_BT = batch["image"], batch["label"], batch["step"]
    schedule = model.schedule
    noise = jax.vmap(lambda k: normal_noise(k, x01.shape[1:]))(keys)
    x0 = jd.to_model_space(x01)
    axes = tuple(range(1, x01.ndim))

    def at_level(n_B):
        x_t = jd.q_sample(x0, n_B, noise, schedule)
        eps = model(x_t, schedule.model_steps[n_B])
        x0_hat = jd.from_model_space(jd.predict_x0(x_t, n_B, eps, schedule), clip=True)
        pred = jnp.argmax(classifier(x0_hat), axis=-1)
        return {"eps_mse": jnp.mean(jnp.square(eps - noise), axis=axes),
                "x0_mse": jnp.mean(jnp.square(x0_hat - x01), axis=axes),
                "correct": (pred == labels).astype(jnp.float32)}

    out = jax.lax.map(at_level, n_BT.T)  # (T, B) -> (B, T)
    out = jax.tree.map(lambda a: a.T, out)
    out["clean_correct"] = (jnp.argmax(classifier(x01), axis=-1) == labels).astype(jnp.float32)
    return out


def evaluate(models: dict, classifier, test_ds, eval_config, mesh) -> dict:
    """The before/after table: for each named DDPM and each ``eval.t_stars``, the mean eps-MSE,
    x0-MSE and the classifier's accuracy (Wilson 95% interval) on the one-step x0 estimate;
    every model sees the same noise (``fold_in(key, example index)``)."""
    from jaxrob.evaluation import run_chunks, wilson_interval

    t_stars = [float(t) for t in eval_config.t_stars]
    if not t_stars:
        raise ValueError("eval.t_stars: expected at least one value")
    batch_size = _common.check_batch_size(int(eval_config.batch_size), mesh, "eval.batch_size")
    n = len(test_ds)
    out: dict = {"num_images": n, "dataset": test_ds.name, "split": test_ds.split}
    for name, model in models.items():
        steps = np.asarray([model.schedule.step_for_t_star(t) for t in t_stars], np.int32)
        data = {"image": test_ds.images, "label": test_ds.labels, "index": test_ds.indices,
                "step": np.broadcast_to(steps[None], (n, len(steps)))}
        rec = run_chunks(_eval_chunk, data, key=jr.key(int(eval_config.seed)),
                         args=(model, classifier), batch_size=min(batch_size, -(-n // mesh.size)
                                                                   * mesh.size),
                         mesh=mesh, progress=False).records
        k = int(rec["clean_correct"].sum())
        out.setdefault("clean_accuracy", {"accuracy": k / n, "correct": k,
                                          "ci95": list(wilson_interval(k, n))})
        rows = {}
        for j, (t, s) in enumerate(zip(t_stars, steps, strict=True)):
            k = int(rec["correct"][:, j].sum())
            rows[f"t_star={t:g}"] = {
                "t_star": t, "step": int(s), "eps_mse": float(rec["eps_mse"][:, j].mean()),
                "x0_mse": float(rec["x0_mse"][:, j].mean()), "x0_accuracy": k / n,
                "x0_correct": k, "x0_ci95": list(wilson_interval(k, n))}
            logging.info("%s t*=%g: eps-MSE %.4f, x0-MSE %.5f, classifier on x0 %.1f%%", name,
                         t, rows[f"t_star={t:g}"]["eps_mse"], rows[f"t_star={t:g}"]["x0_mse"],
                         100 * k / n)
        out[name] = rows
    return out


# ----------------------------------------------------------------------------- run


def export_metadata(config, *, model_meta, ddpm_info, clf_info, options, image_shape,
                    num_steps: int, num_params: int, metrics: dict) -> dict:
    """A DDPM export's metadata (``jaxrob.models.load`` builds it as any DDPM) plus
    ``finetune``: that it is an ADDT fine-tune, of which export, against which classifier, with
    which options."""
    base = ddpm_info["meta"]
    return {
        "kind": "ddpm", "model": model_meta, "diffusion": base["diffusion"],
        "data": {"name": config.data.name, "train_split": config.data.train_split,
                 "image_shape": list(image_shape)},
        "train": _common.to_plain(config.train), "step": int(num_steps), "params": "ema",
        "num_params": int(num_params), "metrics": metrics,
        "finetune": {
            "method": "addt", "variant": config.addt.variant, "options": options,
            "steps": int(num_steps), "seed": int(config.seed),
            "base": {"path": _common.to_plain(config.ddpm.path), "checksum": ddpm_info["checksum"],
                     "step": base.get("step"), "git": base.get("git")},
            "classifier": {"path": _common.to_plain(config.classifier.path),
                           "checksum": clf_info["checksum"],
                           "num_classes": clf_info["meta"].get("num_classes"),
                           "model": clf_info["meta"].get("model")},
        },
        "versions": _common.versions(), "git": _common.git_info(),
    }


def run(config, workdir) -> dict:
    """Fine-tune (or resume), export the EMA params, evaluate; returns ``results.json``'s content.

    Args:
      config: an ADDT config (``configs/*_addt.py``).
      workdir: output directory.
    """
    from jaxrob.checkpoint import Checkpointer, save_params
    from jaxrob.models import DiffusionModel, load, unet_from_metadata
    from jaxrob.training import create_train_state, train_loop

    options = addt_options(config)  # before anything is read or created
    timer, workdir, mesh, batch_size, num_steps, train_ds = _common.begin_training(
        config, workdir)
    tc = config.train
    ddpm_info, clf_info = check_exports(config, train_ds)
    model_meta = model_metadata(config, ddpm_info["meta"])
    image_shape = tuple(train_ds.image_shape)

    base = load(ddpm_info["path"], kind="ddpm")
    classifier = load(clf_info["path"], kind="classifier")
    module = unet_from_metadata(model_meta)
    optimizer, ema = optimizer_options(config, num_steps), ema_options(config)
    cache_key = json.dumps({
        "model": model_meta, "diffusion": ddpm_info["meta"]["diffusion"],
        "classifier": [clf_info["checksum"], clf_info["meta"].get("model"),
                       clf_info["meta"].get("num_classes")],
        "options": options, "optimizer": optimizer, "ema": ema,
        "mesh": [[int(d.id) for d in mesh.devices.flat], list(mesh.axis_names)]},
        sort_keys=True)
    train_step, tx, _ = _train_step(module, base.schedule, classifier, options=options,
                                    optimizer=optimizer, ema=ema, mesh=mesh,
                                    cache_key=cache_key)
    seed = int(config.seed)
    variables = base.variables
    # the base's variables are closed over (constants of the init program): fine at the sizes
    # this trainer runs on CPU; the EMA starts at the base's parameters, as the reference's does
    init_fn = lambda: create_train_state(variables, tx, jr.key(seed), ema=True)
    ckpt = Checkpointer(workdir / "checkpoints",
                        fingerprint=fingerprint(config, ddpm_info, clf_info, options,
                                                model_meta),
                        save_every=_common.check_positive(tc.checkpoint_every,
                                                          "train.checkpoint_every"),
                        max_to_keep=_common.check_positive(tc.keep_checkpoints,
                                                           "train.keep_checkpoints"))
    if ckpt.latest_step() is not None:  # fail before touching anything of the earlier run
        ckpt.check_fingerprint()
    _common.write_json(workdir / "config.json", config)
    with ckpt:
        state, summary = train_loop(
            train_step, init_fn, batch_stream(train_ds, batch_size, seed), num_steps=num_steps,
            workdir=workdir, checkpointer=ckpt, mesh=mesh,
            log_every=_common.check_positive(tc.log_every, "train.log_every"),
            desc=f"addt:{config.addt.variant}")
    num_params = int(sum(x.size for x in jax.tree.leaves(state.params)))
    logging.info("ADDT (%s) fine-tuned %d steps (%d this run) of a %d-parameter UNet; %.3f "
                 "steps/s", config.addt.variant, num_steps, summary["steps_run"], num_params,
                 summary["steps_per_s"])
    ema_vars = {"params": jax.device_get(state.ema_params)}
    results: dict = {
        "variant": config.addt.variant, "options": options,
        "base": {k: ddpm_info[k] for k in ("path", "checksum")},
        "classifier": {k: clf_info[k] for k in ("path", "checksum")},
        "train": {**summary, "num_params": num_params, "batch_size": batch_size,
                  "num_steps": num_steps},
    }
    metrics = {"final_loss": summary["last"].get("loss")}
    test_ds = None
    if config.eval.enabled:
        test_ds = _common.load_split(config.data, config.data.test_split,
                                     num_images=int(config.eval.num_images))
        tuned = DiffusionModel(module, ema_vars, base.schedule)
        results["eval"] = evaluate({"base": base, "finetuned": tuned}, classifier, test_ds,
                                   config.eval, mesh)
        metrics["eval"] = results["eval"]
    results["export"] = str(save_params(
        workdir / "export", ema_vars,
        export_metadata(config, model_meta=model_meta, ddpm_info=ddpm_info, clf_info=clf_info,
                        options=options, image_shape=image_shape, num_steps=num_steps,
                        num_params=num_params, metrics=metrics),
        overwrite=True))
    results["wall_s"] = timer()
    extra = {"num_train_images": len(train_ds)}
    if test_ds is not None:
        extra["test_indices"] = [int(test_ds.indices[0]), int(test_ds.indices[-1]) + 1]
    results["manifest"] = _common.manifest(
        config, wall_s=results["wall_s"],
        seeds={"seed": seed, "eval": int(config.eval.seed)}, extra=extra)
    _common.write_json(workdir / "results.json", results)
    return results
