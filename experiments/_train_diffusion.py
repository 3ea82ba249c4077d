"""The implementation behind ``experiments/train_diffusion.py`` (its docstring says what the run
does); a private module, so the other entry points can share it without importing an entry point.
"""

from __future__ import annotations

import jax
import jax.random as jr
import numpy as np
from absl import logging

from experiments import _common


def fingerprint(config) -> dict:
    """What a checkpoint must agree with to be resumed: model, diffusion and training data."""
    return {"kind": "ddpm", "model": _common.to_plain(config.model),
            "diffusion": _common.to_plain(config.diffusion),
            "data": {"name": config.data.name, "train_split": config.data.train_split}}


def sampling_schedule(schedule, sample_config):
    """The chain a sampler runs: the full schedule, or respaced to ``sample.num_steps``."""
    import jaxrob.diffusion as jd

    n = _common.check_positive(sample_config.num_steps, "sample.num_steps")
    if n > schedule.num_steps:
        raise ValueError(f"sample.num_steps: expected <= {schedule.num_steps} (the schedule), "
                         f"got {n}")
    return schedule if n == schedule.num_steps else jd.respace(schedule, n)


def generate_samples(model, sample_config, image_shape, mesh):
    """``grid**2`` samples in [0, 1] (host array) of a ``DiffusionModel`` and the sampling
    wall time."""
    import jaxrob.diffusion as jd
    from jaxrob.parallel import data_sharding, replicated

    sampler = sample_config.sampler
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sample.sampler: expected 'ddpm' or 'ddim', got {sampler!r}")
    chain = sampling_schedule(model.schedule, sample_config)
    n = _common.check_positive(sample_config.grid, "sample.grid") ** 2
    kw = {"eta": float(sample_config.eta)} if sampler == "ddim" else {}
    out_sharding = data_sharding(mesh) if n % mesh.size == 0 else replicated(mesh)

    from tqdm.auto import tqdm

    bar = tqdm(total=chain.num_steps, desc=f"sampling {n} images ({sampler})", unit="step")
    seen = set()

    def tick(step):  # host callback: one bar step per reverse step (each device reports it)
        step = int(np.asarray(step).reshape(-1)[0])
        if step not in seen:
            seen.add(step)
            bar.update(1)

    def sample(model, key):
        def eps_fn(x, step):
            jax.debug.callback(tick, step)
            return model(x, step)

        x = jd.generate(eps_fn, key, (n, *image_shape), chain, sampler=sampler, **kw)
        return jd.from_model_space(x)

    timer = _common.Timer()
    fn = jax.jit(sample, in_shardings=(replicated(mesh), None), out_shardings=out_sharding)
    x = np.asarray(fn(model, jr.key(int(sample_config.seed))))
    bar.close()
    logging.info("sampled %d images (%s, %d steps) in %.1f s", n, sampler, chain.num_steps,
                 timer())
    return x, timer()


def evaluate_denoising(model, images01, eval_config, mesh) -> dict:
    """``denoising_mse`` of a ``DiffusionModel`` at every ``eval.t_stars``:
    {"t_star=0.1": {...}, ...}."""
    from jaxrob.training import denoising_mse

    t_stars = [float(t) for t in eval_config.t_stars]
    rs = denoising_mse(model, images01, jr.key(int(eval_config.seed)), model.schedule, t_stars,
                       batch_size=int(eval_config.batch_size), mesh=mesh)
    for r in rs:
        logging.info("denoising t*=%.2f (n=%d): eps-MSE %.4f, x0-MSE %.5f (noisy %.5f) on %d "
                     "images", r["t_star"], r["step"], r["eps_mse"], r["x0_mse"],
                     r["noisy_mse"], r["num_images"])
    return {f"t_star={r['t_star']:g}": r for r in rs}


def export_metadata(config, image_shape, num_steps: int, num_params: int,
                    metrics: dict) -> dict:
    """The metadata stored with an EMA export (enough to rebuild the model and schedule)."""
    return {
        "kind": "ddpm", "model": _common.to_plain(config.model),
        "diffusion": _common.to_plain(config.diffusion),
        "data": {"name": config.data.name, "train_split": config.data.train_split,
                 "image_shape": list(image_shape)},
        "train": _common.to_plain(config.train), "step": int(num_steps), "params": "ema",
        "num_params": int(num_params), "metrics": metrics, "versions": _common.versions(),
        "git": _common.git_info(),
    }


def run(config, workdir, *, evaluate: bool = True) -> dict:
    """Train (or resume), evaluate, sample, export; returns what ``results.json`` holds.

    Args:
      config: a DDPM config (``configs/*_ddpm.py``).
      workdir: output directory.
      evaluate: also compute the denoising MSE and the sample grid (``main.py`` does that
        itself and passes False).
    """
    from jaxrob.checkpoint import save_params
    from jaxrob.training import (
        init_ddpm_state,
        make_ddpm_train_step,
        make_optimizer,
    )

    timer, workdir, mesh, batch_size, num_steps, train_ds = _common.begin_training(
        config, workdir)
    tc = config.train
    test_ds = _common.load_split(config.data, config.data.test_split,
                                 name=config.data.get("test_name"),
                                 num_images=int(config.eval.num_images))
    from jaxrob.models import schedule_from_metadata, unet_from_metadata

    model = unet_from_metadata(_common.to_plain(config.model))
    schedule = schedule_from_metadata(_common.to_plain(config.diffusion))
    image_shape = tuple(train_ds.image_shape)
    tx, lr_fn = make_optimizer(name=tc.optimizer, learning_rate=tc.learning_rate,
                               total_steps=num_steps, warmup_steps=tc.warmup_steps,
                               lr_schedule=tc.lr_schedule, weight_decay=tc.weight_decay,
                               grad_clip=tc.grad_clip)
    init_fn = lambda: init_ddpm_state(model, jr.key(int(config.seed)), image_shape, tx,
                                      ema=True)
    train_step = make_ddpm_train_step(model.apply, tx, schedule, ema_decay=tc.ema_decay,
                                      ema_warmup=tc.ema_warmup, lr_fn=lr_fn, mesh=mesh)
    state, summary = _common.run_training(config, workdir, mesh, fingerprint(config), train_step,
                                          init_fn, train_ds, batch_size, num_steps, "ddpm")
    num_params = int(sum(x.size for x in jax.tree.leaves(state.params)))
    logging.info("trained %d steps (%d this run) of a %d-parameter UNet; %.2f steps/s",
                 num_steps, summary["steps_run"], num_params, summary["steps_per_s"])

    ema = {"params": state.ema_params}
    results = {
        "train": {**summary, "num_params": num_params, "batch_size": batch_size,
                  "num_steps": num_steps},
    }
    metrics = {"final_loss": summary["last"].get("loss")}
    if evaluate:
        from jaxrob.models import DiffusionModel

        trained = DiffusionModel(model, ema, schedule)
        results["denoising"] = evaluate_denoising(trained, test_ds.images, config.eval, mesh)
        samples, sample_s = generate_samples(trained, config.sample, image_shape, mesh)
        _common.save_image_grid(workdir / "samples.png", samples,
                                grid=int(config.sample.grid))
        _common.save_npz(workdir / "samples.npz", samples=samples)
        results["samples"] = {"png": "samples.png", "npz": "samples.npz",
                              "sampler": config.sample.sampler,
                              "num_steps": int(config.sample.num_steps),
                              "count": int(len(samples)), "sample_s": sample_s}
        metrics["denoising"] = results["denoising"]
    results["export"] = str(save_params(
        workdir / "export", jax.device_get(ema), export_metadata(config, image_shape, num_steps,
                                                                 num_params, metrics),
        overwrite=True))
    results["wall_s"] = timer()
    results["manifest"] = _common.manifest(
        config, wall_s=results["wall_s"],
        seeds={"seed": int(config.seed), "sample": int(config.sample.seed),
               "eval": int(config.eval.seed)},
        extra={"num_test_images": int(len(test_ds)), "test_indices":
               [int(test_ds.indices[0]), int(test_ds.indices[-1]) + 1]})
    _common.write_json(workdir / "results.json", results)
    return results

