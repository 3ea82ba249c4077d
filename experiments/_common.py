"""Helpers shared by the experiment entry points: config -> objects, manifests, files.

Experiments turn configs into keyword arguments for the library; the library never sees a
ConfigDict. Everything here is experiment plumbing (paths, JSON, PNG, manifests).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import pathlib
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

import jaxrob
from jaxrob.parallel import EOT_AXIS, is_main_process, make_mesh

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
log = logging.getLogger("jaxrob.experiments")


# ----------------------------------------------------------------------------- configs


def to_plain(obj: Any) -> Any:
    """ConfigDict / numpy / tuples -> JSON-able Python (tuples become lists)."""
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, pathlib.Path):
        return str(obj)
    return obj


def get_mesh(mesh_config, *, eot: bool = False) -> jax.sharding.Mesh:
    """The mesh of ``config.mesh``: ``num_devices`` (None: all devices) and ``eot_devices``
    (default 1: a 1-D ``data`` mesh; more: a 2-D ``(data, eot)`` mesh,
    ``jaxrob.parallel.make_mesh(num_devices, eot=eot_devices)``).

    ``eot``: whether the caller shards EoT samples over an ``eot`` axis (robust_eval); the
    others reject ``eot_devices`` other than 1 instead of leaving devices idle.
    """
    n = mesh_config.get("num_devices") if mesh_config is not None else None
    e = mesh_config.get("eot_devices") if mesh_config is not None else None
    e = 1 if e is None else e
    if isinstance(e, bool) or not isinstance(e, int | np.integer) or e < 1:
        raise ValueError(f"mesh.eot_devices: expected a positive integer, got {e!r}")
    if e > 1 and not eot:
        raise ValueError(f"mesh.eot_devices={e}: this experiment does not split EoT samples "
                         "over devices (only experiments/robust_eval.py does); expected 1")
    total = len(jax.devices()) if n is None else n
    if isinstance(total, int) and total >= 1 and total % e:
        raise ValueError(f"mesh.eot_devices={e} does not divide the {total} devices of the "
                         "mesh (mesh.num_devices); use a divisor of it")
    mesh = make_mesh(n, eot=int(e))
    log.info("mesh: %s x %s (%s)", dict(mesh.shape), jax.devices()[0].device_kind,
             jax.default_backend())
    return mesh


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh, what: str) -> int:
    """Reject batch sizes that are not a positive multiple of the device count."""
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size <= 0:
        raise ValueError(f"{what}: expected a positive integer, got {batch_size!r}")
    n = mesh.shape["data"]
    if batch_size % n:
        raise ValueError(f"{what}={batch_size} does not divide over the {n} devices of the "
                         f"mesh; use a multiple of {n} (or set --config.mesh.num_devices)")
    return int(batch_size)


def check_positive(value, what: str) -> int:
    if isinstance(value, bool) or int(value) != value or value <= 0:
        raise ValueError(f"{what}: expected a positive integer, got {value!r}")
    return int(value)


# Where the datasets live in this project's checkout layout (repo/../shared/datasets).
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "datasets"


def data_dir(data_config) -> str | None:
    """``config.data.data_dir``, else ``$JAXROB_DATA_DIR``, else ``../shared/datasets`` when it
    exists (None: let ``jaxrob.data`` raise its "no data directory" error)."""
    explicit = data_config.get("data_dir")
    if explicit:
        return str(explicit)
    if os.environ.get("JAXROB_DATA_DIR"):
        return None
    return str(DEFAULT_DATA_DIR) if DEFAULT_DATA_DIR.is_dir() else None


def load_split(data_config, split: str, *, name: str | None = None, num_images: int = 0):
    """``jaxrob.data.load_dataset`` for a ``config.data`` block; ``num_images`` > 0 keeps the
    first that many examples. ``data.name == "imagenet"`` reads the folder ``data.imagenet_dir``
    with :func:`jaxrob.data.load_imagenet` (lazily: an image is decoded when its row is first
    read, so each process decodes only the rows it places). A
    ``data.image_size`` other than the dataset's resizes the images to it (bilinear; e.g. the
    ImageNet smoke's Tiny-ImageNet images)."""
    from jaxrob.data import ArrayDataset, load_dataset

    name = name or data_config.name
    if name == "imagenet":
        ds = _load_imagenet(data_config, split, num_images)
    else:
        ds = load_dataset(name, split, data_dir=data_dir(data_config))
    if num_images and num_images < len(ds):
        ds = ds.subset(slice(0, int(num_images)))
    size = data_config.get("image_size")
    if size and tuple(ds.image_shape[:2]) != (int(size), int(size)):
        images = np.asarray(jax.image.resize(
            ds.images, (len(ds), int(size), int(size), ds.image_shape[2]), "bilinear"))
        ds = ArrayDataset(images=np.clip(images, 0.0, 1.0).astype(np.float32),
                          labels=ds.labels, name=ds.name, split=ds.split,
                          num_classes=ds.num_classes, indices=ds.indices)
    log.info("data: %r", ds)
    return ds


def _data_file(data_config, field: str, *, folder: bool = False) -> pathlib.Path | None:
    """``config.data.<field>`` resolved against the data directory (absolute paths as they
    are); FileNotFoundError naming the field when it does not exist."""
    value = data_config.get(field)
    if not value:
        return None
    p = pathlib.Path(os.path.expanduser(str(value)))
    if not p.is_absolute():
        from jaxrob.data import resolve_data_dir

        p = resolve_data_dir(data_dir(data_config)) / p
    if not (p.is_dir() if folder else p.is_file()):
        raise FileNotFoundError(
            f"data.{field}: no {'folder' if folder else 'file'} at {p} (set "
            f"--config.data.{field}; relative paths are taken from the data directory)")
    return p


def _load_imagenet(data_config, split: str, num_images: int):
    from jaxrob.data import load_imagenet

    if not data_config.get("imagenet_dir"):
        raise ValueError("data.imagenet_dir: expected the ImageNet validation folder (one "
                         "sub-folder per wnid, or flat with data.labels_file)")
    folder = _data_file(data_config, "imagenet_dir", folder=True)
    return load_imagenet(
        folder, split, image_size=int(data_config.image_size),
        resize_size=data_config.get("resize_size") or None,
        labels_file=_data_file(data_config, "labels_file"),
        meta_file=_data_file(data_config, "meta_file"),
        limit=int(num_images) if num_images else None,
        # decoded on first access: on several JAX processes each decodes only the rows that
        # its devices hold (run_chunks reads row by row), not the whole selection
        lazy=True)


def resolve_path(path: str, *, base: pathlib.Path) -> pathlib.Path:
    p = pathlib.Path(os.path.expanduser(path))
    return p if p.is_absolute() else base / p


def manifest_path(path) -> str:
    """``path`` as a manifest records it: relative to the repository when inside it (so a
    record does not carry the checkout's location), else absolute."""
    p = pathlib.Path(path).resolve()
    try:
        return str(p.relative_to(REPO_ROOT.resolve()))
    except ValueError:
        return str(p)


# ----------------------------------------------------------------------------- manifests


def git_info() -> dict:
    """Commit of the repository (None when not a git checkout or no commit yet) and dirtiness."""

    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        commit = head.stdout.strip() if head.returncode == 0 else None
        status = git("status", "--porcelain", "--untracked-files=no")
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"commit": commit, "dirty": dirty}


def versions() -> dict:
    import flax
    import jaxlib
    import optax

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "jaxrob": jaxrob.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def manifest(config, *, seeds: Mapping[str, int], wall_s: float,
             extra: Mapping[str, Any] | None = None) -> dict:
    """What every results.json carries: config, versions, commit, devices, seeds, wall time."""
    devices = jax.devices()
    return {
        "config": to_plain(config),
        "versions": versions(),
        "git": git_info(),
        "devices": {"backend": jax.default_backend(), "kind": devices[0].device_kind,
                    "count": len(devices), "process_count": jax.process_count(),
                    "xla_flags": os.environ.get("XLA_FLAGS", "")},
        "host": socket.gethostname(),
        "argv": list(sys.argv),
        "seeds": dict(seeds),
        "wall_s": float(wall_s),
        "finished_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **dict(extra or {}),
    }


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write JSON (process 0 only)."""
    if not is_main_process():
        return
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(to_plain(obj), indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def save_npz(path: str | os.PathLike, **arrays) -> None:
    """``np.savez_compressed`` by process 0 only, atomically (a temporary file renamed into
    place: a killed run leaves the old file or none, never half of one)."""
    if is_main_process():
        path = pathlib.Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **{k: np.asarray(v) for k, v in arrays.items()})
        os.replace(tmp, path)


def save_image_grid(path: str | os.PathLike, images01: np.ndarray, *, grid: int,
                    min_size: int = 256) -> None:
    """Save ``grid x grid`` images (NHWC, [0, 1]) as one PNG, upscaled (nearest) to be viewable."""
    from PIL import Image

    if not is_main_process():
        return
    x = np.clip(np.asarray(images01, np.float32), 0.0, 1.0)[: grid * grid]
    n, h, w, c = x.shape
    pad = 1
    canvas = np.ones((grid * (h + pad) + pad, grid * (w + pad) + pad, c), np.float32)
    for i in range(n):
        r, col = divmod(i, grid)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h,
               pad + col * (w + pad): pad + col * (w + pad) + w] = x[i]
    scale = max(1, -(-min_size // canvas.shape[0]))
    img = (canvas * 255.0 + 0.5).astype(np.uint8)
    img = img[..., 0] if c == 1 else img
    pil = Image.fromarray(img)
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil.save(path)


class Timer:
    """Wall-clock timer: ``t = Timer(); ...; t()`` gives seconds since creation."""

    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def log_devices() -> None:
    devs = jax.devices()
    logging.info("JAX %s, backend %s, %d device(s): %s; process %d of %d; XLA_FLAGS=%r",
                 jax.__version__, jax.default_backend(), len(devs), devs[0].device_kind,
                 jax.process_index(), jax.process_count(), os.environ.get("XLA_FLAGS", ""))


def absl_main(run_fn, config_flag, workdir_flag) -> None:
    """Body of every entry point's ``main``: log devices, run, print the results path."""
    log_devices()
    workdir = pathlib.Path(workdir_flag.value)
    results = run_fn(config_flag.value, workdir)
    logging.info("wrote %s", workdir / "results.json")
    summary = {k: v for k, v in results.items() if k in ("accuracy", "denoising", "wall_s",
                                                         "train")}
    print(json.dumps(to_plain(summary), indent=1, default=str))


# ----------------------------------------------------------------------------- entry points


def define_flags(default_config: str | None = None):
    """``--config`` (locked ml_collections config file), ``--workdir``, ``--distributed``."""
    from absl import flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file(
        "config", default_config, "Config file, e.g. configs/digits_ddpm.py (variants: "
        "configs/digits_ddpm.py:smoke; overrides: --config.train.num_steps=100).",
        lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "Output directory (resumes when it holds "
                                  "checkpoints of the same configuration).")
    distributed = flags.DEFINE_bool(
        "distributed", False, "Join a multi-process run first (jaxrob.parallel."
        "initialize_distributed; also on with JAXROB_DISTRIBUTED=1): auto-detected on TPU pods "
        "and SLURM, else give --coordinator_address, --num_processes and --process_id. One "
        "host works without it.")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with "
                        "--distributed; default: auto-detect).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (with --distributed).")
    flags.DEFINE_integer("process_id", None, "This process's id, 0..num_processes-1 (with "
                         "--distributed).")
    flags.DEFINE_float("distributed_timeout_s", 300.0, "Longest wait for the coordinator and "
                       "for the other processes to join (with --distributed).")
    flags.mark_flag_as_required("workdir")
    return config, workdir, distributed


def distributed_flags() -> dict:
    """``start``'s keyword arguments from the ``--coordinator_address``, ``--num_processes``,
    ``--process_id`` and ``--distributed_timeout_s`` flags."""
    from absl import flags

    f = flags.FLAGS
    return {"coordinator_address": f.coordinator_address, "num_processes": f.num_processes,
            "process_id": f.process_id, "timeout_s": f.distributed_timeout_s}


def quiet_orbax() -> None:
    """Drop orbax's INFO chatter (dozens of lines per save) from the absl log; keep warnings."""
    from absl import logging as absl_logging

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "orbax" not in record.pathname

    absl_logging.get_absl_handler().addFilter(keep)


def cli(run_fn, default_config: str | None = None) -> None:
    """Every entry point's ``__main__``: flags, device set-up, ``run_fn(config, workdir)``."""
    from absl import app

    config, workdir, distributed = define_flags(default_config)

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}")
        start(distributed.value, config.value, **distributed_flags())
        absl_main(run_fn, config, workdir)

    app.run(main)


def start(distributed: bool, config=None, *, coordinator_address: str | None = None,
          num_processes: int | None = None, process_id: int | None = None,
          timeout_s: float = 300.0) -> None:
    """First thing in every ``main``: CPU device set-up (before JAX starts), multi-host init.

    ``config.mesh.cpu_ynn`` / ``cpu_no_ynn`` (when set) choose the XLA:CPU YNNPACK setting.
    ``distributed`` (or ``JAXROB_DISTRIBUTED=1`` in the environment, as ``tpu_scripts/run.sh``
    sets it) joins a multi-process run with :func:`jaxrob.parallel.initialize_distributed`.
    """
    from jaxrob.parallel import configure_cpu, initialize_distributed

    mesh_config = config.get("mesh") if config is not None else None
    no_ynn = mesh_config.get("cpu_no_ynn") if mesh_config is not None else None
    ynn = mesh_config.get("cpu_ynn") if mesh_config is not None else None
    configure_cpu(disable_ynn=None if ynn is not None else no_ynn, ynn=ynn)
    quiet_orbax()
    if distributed or os.environ.get("JAXROB_DISTRIBUTED", "0") == "1":
        initialize_distributed(coordinator_address, num_processes, process_id,
                               timeout_s=timeout_s)


# ----------------------------------------------------------------------------- models, studies
# What several entry points share (no entry point imports another): config -> model objects,
# purifier and attack from config, the sweep rows, the common start and end of a study.

DDPM_SOURCES = ("export", "random", "diffusers", "score_sde", "guided_diffusion")
CLASSIFIER_SOURCES = ("akamaster", "export", "robustbench", "torchvision_resnet50", "random")
ATTACKS = ("none", "fgsm", "pgd", "apgd")


def load_ddpm(ddpm_config, image_shape, *, fast_vjp: bool = False):
    """``(model, description)`` for ``config.ddpm``: a :class:`jaxrob.models.DiffusionModel`.

    Sources: ``export`` (a jaxrob export, ``jaxrob.models.load``), ``random`` (``ddpm.model``
    with :func:`jaxrob.models.random_variables`: smoke tests, timing), ``diffusers`` (a
    diffusers ``UNet2DModel`` state dict file, e.g. google/ddpm-cifar10-32, ``ddpm.model.config``
    naming the UNet), ``score_sde`` (score_sde's / DiffPure's PyTorch checkpoint of a DDPM++
    model, e.g. ``checkpoint_8.pth``, EMA weights, ``ddpm.model`` = ``{"name": "ncsnpp",
    "config": <jaxrob.models.NCSNPP_CONFIGS name>}``; its VP chain replaces ``ddpm.diffusion``).
    ``ddpm.model.name == "ncsnpp"`` with ``random`` gives a random DDPM++ of that configuration.
    ``guided_diffusion`` (guided-diffusion's ADM checkpoint, e.g.
    ``256x256_diffusion_uncond.pt``, ``ddpm.model`` = ``{"name": "adm", "config": ...}``).
    ``ddpm.model.name`` ``"adm"`` builds guided-diffusion's ADM (also for ``random``).
    """

    from jaxrob.models import (
        DiffusionModel,
        diffusion_module_from_metadata,
        load,
        load_state_dict_file,
        random_variables,
        schedule_from_metadata,
        unet_from_diffusers_state_dict,
    )

    source = ddpm_config.source
    if source == "export":
        path = resolve_path(ddpm_config.path, base=REPO_ROOT)
        from jaxrob.checkpoint import read_metadata

        meta = read_metadata(path)
        model = load(path, kind="ddpm", fast_vjp=fast_vjp)
        return model, {"source": source, "path": manifest_path(path), "step": meta.get("step"),
                       "num_params": meta.get("num_params")}
    if source not in DDPM_SOURCES:
        raise ValueError(f"ddpm.source: expected one of {list(DDPM_SOURCES)}, got {source!r}")
    if source == "score_sde" or ddpm_config.model.get("name") == "ncsnpp":
        return _load_ncsnpp(ddpm_config, source, fast_vjp=fast_vjp)
    model_meta = to_plain(ddpm_config.model)
    if (source == "guided_diffusion") != (model_meta.get("name") == "adm") and source != "random":
        raise ValueError(f"ddpm.source={source!r} with ddpm.model.name="
                         f"{model_meta.get('name')!r}: guided-diffusion checkpoints are ADMs "
                         f"(name 'adm'), diffusers ones Ho et al. UNets (name 'unet')")
    unet = diffusion_module_from_metadata(model_meta)
    schedule = schedule_from_metadata(to_plain(ddpm_config.diffusion))
    if source == "random":
        if model_meta.get("name") == "adm":  # an ADM checks its input size: its own one
            image_shape = (unet.image_size, unet.image_size, *image_shape[2:])
        # eval_shape + NumPy: jit(unet.init) spends ~20 s compiling threefry on a small CPU
        variables = random_variables(unet, jax.ShapeDtypeStruct((1, *image_shape), np.float32),
                                     jax.ShapeDtypeStruct((1,), np.int32),
                                     seed=int(ddpm_config.seed))
        info = {"source": source, "seed": int(ddpm_config.seed)}
    else:
        path = resolve_path(ddpm_config.path, base=REPO_ROOT)
        if not path.is_file():
            raise FileNotFoundError(f"ddpm.path: no {source} checkpoint at {path} (set "
                                    f"--config.ddpm.path to the downloaded file)")
        if source == "guided_diffusion":
            from jaxrob.models import adm_from_guided_diffusion_state_dict

            variables = adm_from_guided_diffusion_state_dict(load_state_dict_file(path), unet)
        else:
            variables = unet_from_diffusers_state_dict(load_state_dict_file(path), unet)
        info = {"source": source, "path": manifest_path(path)}
    model = DiffusionModel(unet, variables, schedule)
    return (model.with_fast_vjp(True) if fast_vjp else model), info


def _load_ncsnpp(ddpm_config, source: str, *, fast_vjp: bool):
    """``load_ddpm`` of a score_sde DDPM++ (``source`` "score_sde" or "random")."""
    from jaxrob.models import (
        DiffusionModel,
        load_score_sde,
        ncsnpp_from_config,
        random_variables,
        vp_schedule,
    )

    model_config = to_plain(ddpm_config.model)
    if model_config.get("name") != "ncsnpp":
        raise ValueError(f"ddpm.model.name: expected 'ncsnpp' for ddpm.source='score_sde', got "
                         f"{model_config.get('name')!r}")
    overrides = {k: v for k, v in dict(model_config.get("overrides") or {}).items()
                 if v is not None}
    module = ncsnpp_from_config(model_config.get("config", "cifar10_ddpmpp_deep_continuous"),
                                **overrides)
    if source == "random":
        size, ch = module.image_size, module.num_channels
        variables = random_variables(module, jax.ShapeDtypeStruct((1, size, size, ch),
                                                                  np.float32),
                                     jax.ShapeDtypeStruct((1,), np.float32),
                                     seed=int(ddpm_config.seed))
        model = DiffusionModel(module, variables, vp_schedule(module))
        info = {"source": source, "seed": int(ddpm_config.seed), "model": "ncsnpp"}
    elif source == "score_sde":
        path = resolve_path(ddpm_config.path, base=REPO_ROOT)
        if not path.is_file():
            raise FileNotFoundError(
                f"ddpm.path: no score_sde checkpoint at {path} (DiffPure's CIFAR-10 model is "
                f"score_sde's vp/cifar10_ddpmpp_deep_continuous checkpoint_8.pth; set "
                f"--config.ddpm.path=/path/to/checkpoint_8.pth)")
        model = load_score_sde(path, module, use_ema=bool(ddpm_config.get("use_ema", True)))
        info = {"source": source, "path": manifest_path(path), "model": "ncsnpp",
                "use_ema": bool(ddpm_config.get("use_ema", True))}
    else:
        raise ValueError(f"ddpm.source: expected 'score_sde' or 'random' for an ncsnpp model, "
                         f"got {source!r}")
    info["num_params"] = model.num_params
    return (model.with_fast_vjp(True) if fast_vjp else model), info


def load_classifier(model_config, data_config, *, fast_vjp: bool = False):
    """``(classifier, description)`` for ``config.classifier`` / ``config.model``: a
    :class:`jaxrob.models.Classifier` from a jaxrob export or akamaster's CIFAR ResNet file."""
    from jaxrob.models import Classifier, load

    source = model_config.source
    if source == "akamaster":
        from jaxrob.data import resolve_data_dir
        from jaxrob.models import load_akamaster_resnet

        path = resolve_path(model_config.path, base=resolve_data_dir(data_dir(data_config)))
        if not path.is_file():
            raise FileNotFoundError(f"model.path: no pretrained weights at {path}")
        module, variables = load_akamaster_resnet(path)
        model = Classifier(module, variables)
        info = {"source": source, "path": manifest_path(path)}
    elif source == "robustbench":
        from jaxrob.data import resolve_data_dir
        from jaxrob.models import load_state_dict_file, wide_resnet_from_state_dict

        path = resolve_path(model_config.path, base=resolve_data_dir(data_dir(data_config)))
        if not path.is_file():
            raise FileNotFoundError(
                f"classifier.path: no RobustBench WideResNet weights at {path} (DiffPure's "
                f"classifier is RobustBench's CIFAR-10 Linf 'Standard' WRN-28-10, "
                f"models/cifar10/Linf/Standard.pt)")
        module, variables = wide_resnet_from_state_dict(
            load_state_dict_file(path), int(model_config.get("depth", 28)),
            int(model_config.get("widen_factor", 10)))
        model = Classifier(module, variables)
        info = {"source": source, "path": manifest_path(path)}
    elif source == "torchvision_resnet50":
        from jaxrob.models import load_torchvision_resnet

        path = resolve_path(model_config.path, base=REPO_ROOT)
        if not path.is_file():
            raise FileNotFoundError(
                f"classifier.path: no torchvision ResNet-50 weights at {path} (DiffPure's "
                f"ImageNet classifier is torchvision's resnet50 IMAGENET1K_V1, "
                f"resnet50-0676ba61.pth; set --config.classifier.path to the downloaded file)")
        model = load_torchvision_resnet(path, "resnet50",
                                        input_size=model_config.get("input_size") or None)
        info = {"source": source, "path": manifest_path(path), "num_params": model.num_params}
    elif source == "random":
        # a random classifier of config.classifier.model (smoke runs): eval_shape + NumPy
        from jaxrob.models import classifier_from_metadata, random_variables

        model_meta = to_plain(model_config.model)
        if model_config.get("input_size"):  # e.g. the ResNet-50's 256 -> 224 resize
            model_meta["kwargs"] = {**(model_meta.get("kwargs") or {}),
                                    "input_size": int(model_config.input_size)}
        module = classifier_from_metadata(model_meta, int(model_config.num_classes))
        size = int(data_config.image_size)
        variables = random_variables(module, jax.ShapeDtypeStruct((1, size, size, 3),
                                                                  np.float32),
                                     seed=int(model_config.get("seed") or 0))
        model = Classifier(module, variables)
        info = {"source": source, "seed": int(model_config.get("seed") or 0),
                "num_params": model.num_params}
    elif source == "export":
        from jaxrob.checkpoint import read_metadata

        path = resolve_path(model_config.path, base=REPO_ROOT)
        model = load(path, kind="classifier")
        info = {"source": source, "path": manifest_path(path),
                "export_step": read_metadata(path).get("step")}
    else:
        raise ValueError(f"model.source: expected one of {list(CLASSIFIER_SOURCES)}, got "
                         f"{source!r}")
    return (model.with_fast_vjp(True) if fast_vjp else model), info


def make_purifier(purifier_config, model):
    """A :class:`jaxrob.purify.Purifier` over ``model`` from ``config.purifier`` (None when
    disabled). ``purifier.input_size`` (optional; None: the data's size): the side the
    diffusion model runs at, the purifier resizing its input to it and its output back
    (bilinear, PyTorch's ``align_corners=False``), as DiffPure does on ImageNet."""
    from jaxrob.purify import diffpure, multistage

    p = purifier_config
    if not p.enabled:
        return None
    kw = dict(sampler=p.sampler, gradient=p.gradient, surrogate_steps=p.get("surrogate_steps"),
              variance=p.variance, eta=float(p.eta), remat=bool(p.remat))
    if p.get("input_size"):  # the diffusion model's side (DiffPure's ImageNet 224 -> 256 -> 224)
        kw["input_size"] = int(p.input_size)
    stages = p.get("stages")
    if stages:
        return multistage(model, stages=[tuple(s) for s in stages], **kw)
    return diffpure(model, t_star=float(p.t_star), num_steps=int(p.num_steps), **kw)


def make_attack(attack_config, *, return_iterates: bool = False,
                mesh: jax.sharding.Mesh | None = None, defended=None):
    """``attack(model, x, y, key) -> AttackResult`` from ``config.attack`` (None for "none").

    ``return_iterates``: the attack also returns its iterates (PGD / APGD; the candidates of a
    ``fixed_aa`` protocol).

    ``mesh``: the run's mesh; a 2-D ``(data, eot)`` one (``mesh.eot_devices`` > 1) is given to
    the attack as ``eot_mesh`` (each chunk of EoT samples split over ``eot``), so the EoT chunk
    (``eot_chunk``, else ``eot_samples``) must divide by its size; an attack with
    ``eot_samples=1`` has nothing to split and gets no ``eot_mesh``.

    ``defended``: the defended model (a :class:`jaxrob.purify.DefendedModel`) that DiffAttack's
    loss (``attack.loss == "diffattack"``) reads the purifier's chain states from; the attack
    is given it as a pytree (its parameters traced). Needed only to run such an attack.

    A ``jax.tree_util.Partial``: the attack function is static and its options hash by value,
    so two attacks built from the same config share one compilation.
    """
    from jax.tree_util import Partial

    from jaxrob import attacks

    a = attack_config
    name = a.name
    if name not in ATTACKS:
        raise ValueError(f"attack.name: expected one of {list(ATTACKS)}, got {name!r}")
    if name == "none":
        return None
    eps = float(a.eps)
    if eps < 0:
        raise ValueError(f"attack.eps: expected >= 0, got {eps}")
    eot_samples, eot_chunk = int(a.eot_samples), a.get("eot_chunk")
    if eot_samples < 1 or (eot_chunk is not None and (eot_chunk < 1 or eot_samples % eot_chunk)):
        raise ValueError(f"attack.eot_chunk: expected a positive divisor of attack.eot_samples="
                         f"{eot_samples}, got {eot_chunk}")
    common = dict(eps=eps, loss=a.loss, eot_samples=eot_samples, eot_chunk=eot_chunk)
    if mesh is not None and EOT_AXIS in mesh.shape and eot_samples > 1:
        e, chunk = mesh.shape[EOT_AXIS], eot_samples if eot_chunk is None else int(eot_chunk)
        if chunk % e:
            raise ValueError(f"mesh.eot_devices={e}: expected it to divide the EoT chunk "
                             f"(attack.eot_chunk={eot_chunk}, attack.eot_samples="
                             f"{eot_samples}); got a chunk of {chunk}")
        common["eot_mesh"] = mesh
    if name == "fgsm":
        if return_iterates:
            raise ValueError("eval.candidates: fgsm has no iterates; use pgd or apgd")
        return Partial(attacks.fgsm, **common)
    if return_iterates:  # only when asked: the plain attack's options (and cache key) unchanged
        common["return_iterates"] = True
    kw = dict(norm=a.norm, num_steps=int(a.num_steps), random_start=bool(a.random_start),
              num_restarts=int(a.num_restarts), **common)
    if name == "pgd":
        kw["step_size"] = a.get("step_size")
    inner = attacks.pgd if name == "pgd" else attacks.apgd
    if a.loss != "diffattack":
        return Partial(inner, **kw)
    d = a.get("diffattack")
    if d is None:
        raise ValueError("attack.loss='diffattack': expected an attack.diffattack block "
                         "(configs/_common.robust_eval_options adds it)")
    if d.base not in attacks.LOSSES:
        raise ValueError(f"attack.diffattack.base: expected one of {list(attacks.LOSSES)}, got "
                         f"{d.base!r}")
    if not float(d.weight) >= 0:
        raise ValueError(f"attack.diffattack.weight: expected >= 0, got {d.weight}")
    kw.pop("loss")
    return Partial(_diffattack_attack, defended=defended, inner=inner, base=d.base,
                   weight=float(d.weight), num_states=d.get("num_states"), **kw)


def _diffattack_attack(model, x, y, key, *, defended, inner, base, weight, num_states, **kw):
    """``inner`` (PGD / APGD) on DiffAttack's loss (Kang et al.) built for these clean ``x``:
    the classification loss ``base`` plus ``weight`` x the deviated-reconstruction term over
    the chain states of ``defended``'s purifier (:func:`jaxrob.attacks.diffattack_loss`),
    purified with keys drawn from the attack's ``key`` (fresh noise per iteration and EoT
    sample: the stochastic setting). The attack runs on ``defended`` itself, not on ``model``
    (the evaluation's key-adapting wrapper of it), since the loss must belong to the model
    attacked; in the stochastic setting both draw fresh noise from the attack's keys."""
    from jaxrob import attacks

    if defended is None:
        raise ValueError("attack.loss='diffattack': make_attack needs defended= (the model "
                         "whose purifier the loss reads)")
    loss = attacks.diffattack_loss(defended, x, base=base, weight=weight, num_states=num_states)
    del model
    return inner(defended, x, y, key, loss=loss, **kw)


def row_config(config, row):
    """The base config with one sweep row merged in.

    A row is a nested dict mirroring the config (``{"name": "ddim_t0.3", "purifier":
    {"sampler": "ddim", "t_star": 0.3}, "eval": {"randomness": "fixed"}}``); every field must
    exist in the base config with a compatible type (the merge goes through a locked
    ``ConfigDict``), so a mistyped row fails before any work.
    """
    from ml_collections import config_dict

    c = config.copy_and_resolve_references()
    c.lock()
    row = dict(to_plain(row))
    row.pop("name", None)

    def merge(node, updates, where):
        for k, v in updates.items():
            path = f"{where}{k}"
            if k not in node:
                raise ValueError(f"rows: unknown config field {path!r}")
            if isinstance(v, Mapping) and isinstance(node[k], config_dict.ConfigDict):
                merge(node[k], v, f"{path}.")
            else:
                try:
                    node[k] = tuple(v) if isinstance(v, list) else v
                except TypeError as e:
                    raise ValueError(f"rows: {path}: {e}") from None

    merge(c, row, "")
    c.unlock()
    return c


def begin(config, workdir, *, write_config: bool = True, eot: bool = False):
    """The start of every run: ``(timer, workdir, mesh)``, the workdir created and (unless
    ``write_config=False``, for runs that check a checkpoint first) ``config.json`` written.
    ``eot``: the run splits EoT samples over ``config.mesh.eot_devices`` (:func:`get_mesh`)."""
    timer = Timer()
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if write_config:
        write_json(workdir / "config.json", config)
    return timer, workdir, get_mesh(config.mesh, eot=eot)



def begin_training(config, workdir):
    """:func:`begin` for a trainer, plus its checked batch size, step count and train split:
    ``(timer, workdir, mesh, batch_size, num_steps, train_ds)``."""
    timer, workdir, mesh = begin(config, workdir, write_config=False)
    batch_size = check_batch_size(config.train.batch_size, mesh, "train.batch_size")
    num_steps = check_positive(config.train.num_steps, "train.num_steps")
    train_ds = load_split(config.data, config.data.train_split)
    return timer, workdir, mesh, batch_size, num_steps, train_ds


def run_training(config, workdir, mesh, fingerprint, train_step, init_fn, dataset, batch_size,
                 num_steps, desc, *, keys=("image",)):
    """The trainers' resumable loop: checkpoints (fingerprint-checked before anything of an
    earlier run is touched), config.json, metrics, progress. ``keys``: the dataset fields each
    batch carries. Returns ``train_loop``'s ``(state, summary)``."""
    from jaxrob.checkpoint import Checkpointer
    from jaxrob.training import step_batches, train_loop

    tc = config.train
    ckpt = Checkpointer(workdir / "checkpoints", fingerprint=fingerprint,
                        save_every=check_positive(tc.checkpoint_every, "train.checkpoint_every"),
                        max_to_keep=tc.keep_checkpoints)
    if ckpt.latest_step() is not None:  # fail before touching anything of the earlier run
        ckpt.check_fingerprint()
    write_json(workdir / "config.json", config)
    with ckpt:
        return train_loop(
            train_step, init_fn,
            lambda start: step_batches(dataset, batch_size, seed=int(config.seed),
                                       start_step=start, keys=keys),
            num_steps=num_steps, workdir=workdir, checkpointer=ckpt, mesh=mesh,
            log_every=check_positive(tc.log_every, "train.log_every"), desc=desc)


def start_study(config, workdir, what: str, *, single_stage: bool = False,
                fast_vjp: bool = False):
    """Common start of the purifier studies: workdir, config.json, test split, DDPM, purifier.

    Returns ``(timer, workdir, test, purifier, ddpm_info)``; ``what`` names the study in the
    error raised when ``config.purifier`` is disabled (or not single-stage when required).
    ``fast_vjp``: build the purifier over the UNet's reverse-mode twin (same parameters; for
    studies that differentiate through it in reverse mode only).
    """
    timer, workdir, _ = begin(config, workdir)
    test = load_split(config.data, config.data.test_split,
                      num_images=int(config.data.num_images))
    ddpm, ddpm_info = load_ddpm(config.ddpm, tuple(test.image_shape), fast_vjp=fast_vjp)
    purifier = make_purifier(config.purifier, ddpm)
    if purifier is None or (single_stage and len(purifier.stages) != 1):
        kind = "one single-stage purifier" if single_stage else "a purifier"
        raise ValueError(f"purifier: the {what} needs {kind}")
    return timer, workdir, test, purifier, ddpm_info


def write_results(config, workdir: pathlib.Path, results: dict, test) -> dict:
    """Add the manifest (with the images' dataset, split and index range) and write
    ``results.json``; returns ``results``."""
    results["manifest"] = manifest(
        config, wall_s=results["wall_s"], seeds={"seed": int(config.seed)},
        extra={"num_images": len(test), "dataset": test.name, "split": test.split,
               "indices": [int(test.indices[0]), int(test.indices[-1]) + 1]})
    write_json(workdir / "results.json", results)
    return results
