"""The implementation behind ``experiments/train_ldm.py`` (its docstring says what the runs do);
a private module, so other entry points can share it without importing an entry point.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from absl import logging

from experiments import _common

STAGES = ("autoencoder", "ldm")


def run(config, workdir) -> dict:
    """Train (or resume) one stage of a latent diffusion model; returns ``results.json``'s
    content. ``config.stage``: ``"autoencoder"`` or ``"ldm"``."""
    stage = config.get("stage")
    if stage not in STAGES:
        raise ValueError(f"stage: expected one of {list(STAGES)}, got {stage!r}")
    return run_autoencoder(config, workdir) if stage == "autoencoder" else run_ldm(config,
                                                                                   workdir)


def _optimizer(tc, num_steps):
    from jaxrob.training import make_optimizer

    return make_optimizer(name=tc.optimizer, learning_rate=tc.learning_rate,
                          total_steps=num_steps, warmup_steps=tc.warmup_steps,
                          lr_schedule=tc.lr_schedule, weight_decay=tc.weight_decay,
                          grad_clip=tc.grad_clip)


# ----------------------------------------------------------------------------- autoencoder


def autoencoder_meta(config) -> dict:
    """The ``autoencoder`` block of the metadata (without the scaling, known after training)."""
    return {"config": _common.to_plain(config.autoencoder.config),
            "overrides": _common.to_plain(config.autoencoder.overrides)}


def _reconstruction_grid(ae, images, grid: int):
    """Rows alternate originals and their reconstructions (grid x grid tiles)."""
    n = grid * grid // 2
    x = np.asarray(images[:n])
    x_hat = np.asarray(jax.jit(lambda m, x: m.decode(m.encode_latent(x)))(ae, jnp.asarray(x)))
    rows = []
    for r in range(0, n, grid):
        rows += [x[r:r + grid], x_hat[r:r + grid]]
    return np.concatenate(rows)


def run_autoencoder(config, workdir) -> dict:
    """Train the KL autoencoder, set its code scaling factor, measure reconstruction, export."""
    from jaxrob.checkpoint import save_params
    from jaxrob.models import Autoencoder, autoencoder_from_metadata
    from jaxrob.training import (
        init_autoencoder_state,
        latent_scaling_factor,
        make_autoencoder_train_step,
        reconstruction_metrics,
    )

    meta_ae = autoencoder_meta(config)
    module = autoencoder_from_metadata(meta_ae)
    timer, workdir, mesh, batch_size, num_steps, train_ds = _common.begin_training(
        config, workdir)
    image_shape = tuple(train_ds.image_shape)
    code_shape = module.latent_shape(image_shape)  # a size it cannot halve evenly fails here
    tc, ec = config.train, config.eval
    test_ds = _common.load_split(config.data, config.data.test_split,
                                 name=config.data.get("test_name"),
                                 num_images=int(ec.num_images))
    tx, lr_fn = _optimizer(tc, num_steps)
    train_step = make_autoencoder_train_step(
        module, tx, kl_weight=float(tc.kl_weight), recon=tc.recon, ema_decay=tc.ema_decay,
        ema_warmup=tc.ema_warmup, lr_fn=lr_fn, mesh=mesh)
    init_fn = lambda: init_autoencoder_state(module, jr.key(int(config.seed)), image_shape, tx)
    fingerprint = {"kind": "autoencoder", "autoencoder": meta_ae,
                   "data": {"name": config.data.name, "train_split": config.data.train_split},
                   "loss": {"kl_weight": float(tc.kl_weight), "recon": tc.recon}}
    state, summary = _common.run_training(config, workdir, mesh, fingerprint, train_step,
                                          init_fn, train_ds, batch_size, num_steps, "autoencoder")
    num_params = int(sum(x.size for x in jax.tree.leaves(state.params)))
    logging.info("trained %d steps (%d this run) of a %d-parameter autoencoder; %.2f steps/s",
                 num_steps, summary["steps_run"], num_params, summary["steps_per_s"])

    variables = {"params": state.ema_params}
    ae = Autoencoder(module, variables)
    n_scale = min(int(ec.scaling_images), len(train_ds))
    t = _common.Timer()
    scale = latent_scaling_factor(ae, train_ds.images[:n_scale], jr.key(int(ec.seed)),
                                  batch_size=int(ec.batch_size), mesh=mesh)
    ae = ae.replace(scaling_factor=scale)
    recon = reconstruction_metrics(ae, test_ds.images, batch_size=int(ec.batch_size), mesh=mesh)
    logging.info("code scaling factor %.4f (1/std over %d training images' codes); test "
                 "reconstruction PSNR %.2f dB (of the mean MSE: %.2f dB), MSE %.5f, L1 %.4f on "
                 "%d images (%.1f s)", scale, n_scale, recon["psnr"], recon["psnr_of_mse"],
                 recon["mse"], recon["l1"], recon["num_images"], t())
    grid = int(ec.grid)
    _common.save_image_grid(workdir / "reconstructions.png",
                            _reconstruction_grid(ae, test_ds.images, grid), grid=grid)
    metrics = {"final": summary["last"], "reconstruction": recon,
               "scaling": {"scaling_factor": scale, "num_images": n_scale}}
    meta = {
        "kind": "autoencoder",
        "autoencoder": {**meta_ae, "scaling_factor": scale, "shift_factor": 0.0},
        "data": {"name": config.data.name, "train_split": config.data.train_split,
                 "image_shape": list(image_shape), "code_shape": list(code_shape)},
        "train": _common.to_plain(tc), "step": int(num_steps), "params": "ema",
        "num_params": num_params, "metrics": metrics, "versions": _common.versions(),
        "git": _common.git_info(),
    }
    results = {"train": {**summary, "num_params": num_params, "batch_size": batch_size,
                         "num_steps": num_steps},
               "reconstruction": recon, "scaling_factor": scale,
               "code_shape": list(code_shape), "reconstructions_png": "reconstructions.png"}
    results["export"] = str(save_params(workdir / "export", jax.device_get(variables), meta,
                                        overwrite=True))
    results["wall_s"] = timer()
    results["manifest"] = _common.manifest(
        config, wall_s=results["wall_s"],
        seeds={"seed": int(config.seed), "eval": int(ec.seed)},
        extra={"num_test_images": int(len(test_ds))})
    _common.write_json(workdir / "results.json", results)
    return results


# ----------------------------------------------------------------------------- latent DDPM


def code_dataset(ae, train_ds, batch_size: int, mesh):
    """The training set as posterior moments in code space: an ``ArrayDataset`` whose
    "images" are ``concat([z_mean, z_std], channels)`` (the train step draws ``z_mean + z_std *
    eps`` from them; labels and indices are the images')."""
    from jaxrob.data import ArrayDataset
    from jaxrob.training import encode_dataset

    z, std = encode_dataset(ae, train_ds.images, batch_size=batch_size, mesh=mesh)
    moments = np.concatenate([z, std], axis=-1).astype(np.float32)
    return ArrayDataset(moments, np.asarray(train_ds.labels), f"{train_ds.name}_codes",
                        train_ds.split, train_ds.num_classes, np.asarray(train_ds.indices))


def posterior_draw(channels: int):
    """``latents_fn`` of the latent DDPM step: a posterior draw from stored moments."""
    from jaxrob.training import normal_noise

    def latents_fn(batch, key):
        m = batch["image"]
        mean, std = m[..., :channels], m[..., channels:]
        return mean + std * normal_noise(key, mean.shape)

    return latents_fn


def generate_images(ldm, sample_config, mesh):
    """``grid**2`` decoded samples of a :class:`LatentDiffusionModel` (host array in [0, 1]),
    the sampling wall time, and the codes."""
    import jaxrob.diffusion as jd
    from experiments._train_diffusion import sampling_schedule
    from jaxrob.parallel import replicated

    sampler = sample_config.sampler
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sample.sampler: expected 'ddpm' or 'ddim', got {sampler!r}")
    chain = sampling_schedule(ldm.schedule, sample_config)
    n = _common.check_positive(sample_config.grid, "sample.grid") ** 2
    kw = {"eta": float(sample_config.eta)} if sampler == "ddim" else {}

    def sample(ldm, key):
        z = jd.generate(ldm.diffusion, key, (n, *ldm.latent_shape), chain, sampler=sampler,
                        **kw)
        return ldm.decode(z), z

    timer = _common.Timer()
    fn = jax.jit(sample, in_shardings=(replicated(mesh), None))
    x, z = jax.device_get(fn(ldm, jr.key(int(sample_config.seed))))
    logging.info("sampled %d latent codes (%s, %d steps) and decoded them in %.1f s", n,
                 sampler, chain.num_steps, timer())
    return np.asarray(x), timer(), np.asarray(z)


def score_samples(path: str, images) -> dict:
    """A classifier export's view of decoded samples: predicted-class counts and confidence."""
    from jaxrob.models import load

    clf = load(_common.resolve_path(path, base=_common.REPO_ROOT), kind="classifier")
    p = np.asarray(jax.nn.softmax(jax.jit(lambda m, x: m(x))(clf, jnp.asarray(images)), -1))
    conf = p.max(-1)
    return {"classifier": path, "count": int(len(images)),
            "class_counts": np.bincount(p.argmax(-1), minlength=p.shape[-1]).tolist(),
            "mean_confidence": float(conf.mean()),
            "frac_confidence_gt_0.9": float((conf > 0.9).mean())}


def run_ldm(config, workdir) -> dict:
    """Train (or resume) a DDPM on the scaled codes of an autoencoder export, sample, export
    both as one ``"ldm"`` export."""
    from jaxrob.checkpoint import export_checksum, read_metadata, save_params
    from jaxrob.models import (
        DiffusionModel,
        LatentDiffusionModel,
        load,
        schedule_from_metadata,
        unet_from_metadata,
    )
    from jaxrob.training import init_ddpm_state, make_ddpm_train_step

    ae_path = _common.resolve_path(config.autoencoder.path, base=_common.REPO_ROOT)
    ae = load(ae_path, kind="autoencoder")
    ae_meta = read_metadata(ae_path)
    unet = unet_from_metadata(_common.to_plain(config.model))
    schedule = schedule_from_metadata(_common.to_plain(config.diffusion))
    timer, workdir, mesh, batch_size, num_steps, train_ds = _common.begin_training(
        config, workdir)
    image_shape = tuple(train_ds.image_shape)
    # refuses a UNet that does not take the autoencoder's codes, before any work
    LatentDiffusionModel(ae, DiffusionModel(unet, {}, schedule), image_shape)
    code_shape = ae.latent_shape(image_shape)
    tc, ec = config.train, config.eval

    t = _common.Timer()
    codes = code_dataset(ae, train_ds, int(ec.batch_size), mesh)
    c = code_shape[-1]
    z, std = codes.images[..., :c], codes.images[..., c:]
    code_stats = {"num_images": len(codes), "z_mean_std": float(z.std()),
                  "z_mean_mean": float(z.mean()), "posterior_std_rms":
                  float(np.sqrt(np.mean(np.square(std)))), "encode_s": t()}
    logging.info("codes of %d training images in %.1f s: posterior means mean %.3f, std %.3f; "
                 "posterior std (rms) %.4f", len(codes), code_stats["encode_s"],
                 code_stats["z_mean_mean"], code_stats["z_mean_std"],
                 code_stats["posterior_std_rms"])

    tx, lr_fn = _optimizer(tc, num_steps)
    init_fn = lambda: init_ddpm_state(unet, jr.key(int(config.seed)), code_shape, tx, ema=True)
    train_step = make_ddpm_train_step(unet.apply, tx, schedule, ema_decay=tc.ema_decay,
                                      ema_warmup=tc.ema_warmup, lr_fn=lr_fn, mesh=mesh,
                                      latents_fn=posterior_draw(c))
    ae_ref = {"path": str(config.autoencoder.path), "checksum": export_checksum(ae_path)}
    fingerprint = {"kind": "ldm", "model": _common.to_plain(config.model),
                   "diffusion": _common.to_plain(config.diffusion), "autoencoder": ae_ref,
                   "data": {"name": config.data.name, "train_split": config.data.train_split}}
    state, summary = _common.run_training(config, workdir, mesh, fingerprint, train_step,
                                          init_fn, codes, batch_size, num_steps, "ldm")
    num_params = int(sum(x.size for x in jax.tree.leaves(state.params)))
    logging.info("trained %d steps (%d this run) of a %d-parameter latent UNet; %.2f steps/s",
                 num_steps, summary["steps_run"], num_params, summary["steps_per_s"])

    ema = {"params": state.ema_params}
    ldm = LatentDiffusionModel(ae, DiffusionModel(unet, ema, schedule), image_shape)
    samples, sample_s, _ = generate_images(ldm, config.sample, mesh)
    grid = int(config.sample.grid)
    _common.save_image_grid(workdir / "samples.png", samples, grid=grid)
    _common.save_npz(workdir / "samples.npz", samples=samples)
    results = {"train": {**summary, "num_params": num_params, "batch_size": batch_size,
                         "num_steps": num_steps},
               "codes": code_stats, "code_shape": list(code_shape),
               "samples": {"png": "samples.png", "npz": "samples.npz",
                           "sampler": config.sample.sampler,
                           "num_steps": int(config.sample.num_steps),
                           "count": int(len(samples)), "sample_s": sample_s}}
    if ec.get("classifier"):
        results["samples"]["scores"] = score_samples(ec.classifier, samples)
        logging.info("samples as the classifier sees them: %s", results["samples"]["scores"])
    metrics = {"final": summary["last"], "codes": code_stats,
               "samples": results["samples"].get("scores"),
               "autoencoder": ae_meta.get("metrics", {}).get("reconstruction")}
    meta = {
        "kind": "ldm",
        "autoencoder": ae_meta["autoencoder"],
        "autoencoder_export": ae_ref,
        "model": _common.to_plain(config.model),
        "diffusion": _common.to_plain(config.diffusion),
        "data": {"name": config.data.name, "train_split": config.data.train_split,
                 "image_shape": list(image_shape), "code_shape": list(code_shape)},
        "train": _common.to_plain(tc), "step": int(num_steps), "params": "ema",
        "num_params": num_params + ae.num_params, "metrics": metrics,
        "versions": _common.versions(), "git": _common.git_info(),
    }
    params = {"autoencoder": jax.device_get(ae.variables), "diffusion": jax.device_get(ema)}
    results["export"] = str(save_params(workdir / "export", params, meta, overwrite=True))
    results["wall_s"] = timer()
    results["manifest"] = _common.manifest(
        config, wall_s=results["wall_s"],
        seeds={"seed": int(config.seed), "sample": int(config.sample.seed)},
        extra={"autoencoder": ae_ref})
    _common.write_json(workdir / "results.json", results)
    return results
