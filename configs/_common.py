"""Shared pieces of the configs (not a config itself: it has no ``get_config``).

Every config is ``get_config(arg=None)``; ``arg`` is ``None``/``""`` (the real run) or
``"smoke"`` (same code path, tiny data and steps, seconds on CPU; used by the tests).
"""

from ml_collections import config_dict

VARIANTS = ("", "smoke")


def parse_arg(arg: str | None, variants=VARIANTS) -> str:
    """Normalise the ``file.py:arg`` part of ``--config``; raises on an unknown variant."""
    arg = (arg or "").strip()
    if arg not in variants:
        raise ValueError(f"config variant: expected one of {list(variants)} (e.g. "
                         f"--config configs/digits_ddpm.py:smoke), got {arg!r}")
    return arg


def mesh(cpu_no_ynn: bool | None = None, cpu_ynn: str | None = None
         ) -> config_dict.ConfigDict:
    """Devices of a run.

    ``num_devices``: None = every device (on CPU: ``JAXROB_CPU_DEVICES``, default 2 host
    devices). ``cpu_no_ynn``: turn off XLA:CPU's YNNPACK fusions (None: the
    ``JAXROB_CPU_NO_YNN`` environment default); 1.3-1.7x faster training of the small UNets on
    the 2-core CPU (PERF_NOTES §2, §7), no effect on accelerators, but on more than one host
    device ``jaxrob.parallel.configure_cpu`` uses ``"no_conv"`` instead: XLA:CPU computes wrong
    values with YNN off when several devices run at once (docs/known_faults.md). ``cpu_ynn``:
    the finer choice of ``jaxrob.parallel.YNN_MODES`` (``"all"``, ``"no_conv"``, ``"off"``;
    None: from ``cpu_no_ynn`` / the environment); ``"no_conv"`` (Eigen convolutions, YNNPACK for
    the rest) is the fastest for reverse-mode Jacobians and spectra of the fast-VJP UNets
    (``benchmarks/README.md``).

    ``eot_devices``: devices that the EoT samples of each example are split over
    (``jaxrob.parallel.make_mesh(num_devices, eot=eot_devices)``: a 2-D ``(data, eot)`` mesh,
    the batch on ``num_devices // eot_devices`` devices of ``data``). 1 (default): a 1-D
    ``data`` mesh, EoT samples computed on the device of their example. More: a batch smaller
    than the device count still uses every device; the per-example records are the 1-device
    ones (per-example keys). Only ``experiments/robust_eval.py`` reads it (the other
    experiments reject a value other than 1); it must divide the mesh's devices, and each
    attack's EoT chunk (``attack.eot_chunk``, else ``attack.eot_samples``) must divide by it
    (rows with ``eot_samples=1`` have nothing to split and run on ``data`` alone); AutoAttack
    rows need 1.
    """
    return config_dict.ConfigDict({"num_devices": config_dict.placeholder(int),
                                   "eot_devices": 1,
                                   "cpu_no_ynn": config_dict.placeholder(bool)
                                   if cpu_no_ynn is None else cpu_no_ynn,
                                   "cpu_ynn": config_dict.placeholder(str)
                                   if cpu_ynn is None else cpu_ynn})


def data(name: str, train_split: str, test_split: str) -> config_dict.ConfigDict:
    return config_dict.ConfigDict({
        "name": name,
        "train_split": train_split,
        "test_split": test_split,
        # None: $JAXROB_DATA_DIR (the datasets folder); unused for the bundled digits
        "data_dir": config_dict.placeholder(str),
    })


_UNET_FIELDS = {"ch": int, "ch_mult": tuple, "num_res_blocks": int, "attn_resolutions": tuple,
                "dropout": float, "num_groups": int}


def unet_overrides(**values) -> config_dict.ConfigDict:
    """Every overridable UNet argument as a typed field (None: keep the named config's value),
    so ``--config.model.overrides.ch=16`` works on a locked config."""
    unknown = set(values) - set(_UNET_FIELDS)
    if unknown:
        raise ValueError(f"unet_overrides: unknown UNet argument(s) {sorted(unknown)}")
    return config_dict.ConfigDict({
        k: values[k] if values.get(k) is not None else config_dict.placeholder(t)
        for k, t in _UNET_FIELDS.items()})


def ddpm_base() -> config_dict.ConfigDict:
    """Defaults of a DDPM run; configs override model/data/steps."""
    c = config_dict.ConfigDict()
    c.seed = 0
    c.data = data("digits", "train", "test")
    c.model = config_dict.ConfigDict({
        "name": "unet",
        "config": "digits",  # a key of jaxrob.models.UNET_CONFIGS
        # overrides of that configuration's UNet arguments; None keeps the named config's value
        "overrides": unet_overrides(dropout=0.0, ch=16, num_groups=4),
    })
    c.diffusion = config_dict.ConfigDict({
        "schedule": "linear", "num_steps": 1000, "beta_start": 1e-4, "beta_end": 0.02})
    c.train = config_dict.ConfigDict({
        "batch_size": 128,
        "num_steps": 1500,
        "optimizer": "adamw",
        "learning_rate": 2e-3,
        "lr_schedule": "cosine",
        "warmup_steps": 100,
        "weight_decay": 0.0,
        "grad_clip": 1.0,
        "ema_decay": 0.999,
        "ema_warmup": True,
        "log_every": 100,
        "checkpoint_every": 500,
        "keep_checkpoints": 2,
    })
    c.sample = config_dict.ConfigDict({
        "sampler": "ddpm",  # "ddpm" over the full schedule, or "ddim" over num_steps steps
        "num_steps": 1000,  # respaced to this many steps (ignored by ddpm when = schedule)
        "eta": 0.0,  # DDIM eta
        "grid": 8,  # grid x grid samples in samples.png
        "seed": 1,
    })
    c.eval = config_dict.ConfigDict({
        "t_stars": (0.1, 0.3),
        "num_images": 0,  # 0: the whole test split
        "batch_size": 500,
        "seed": 2,
    })
    c.mesh = mesh(cpu_ynn="no_conv")  # not "off": docs/known_faults.md
    return c


def ddpm_smoke(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
    """Shrink a DDPM config so it runs in seconds (tiny UNet, 3 steps, 5 DDIM steps)."""
    c.model.overrides = unet_overrides(dropout=0.0, ch=8, ch_mult=(1,), num_res_blocks=1,
                                       attn_resolutions=(), num_groups=4)
    c.diffusion.num_steps = 50
    c.train.update(batch_size=16, num_steps=3, warmup_steps=1, log_every=1,
                   checkpoint_every=2)
    c.sample.update(sampler="ddim", num_steps=5, grid=2)
    c.eval.update(num_images=16, batch_size=16)
    return c


def classifier_base() -> config_dict.ConfigDict:
    """Defaults of a classifier run."""
    c = config_dict.ConfigDict()
    c.seed = 0
    c.data = data("digits", "train", "test")
    c.model = config_dict.ConfigDict({
        "name": "small_cnn",  # a key of jaxrob.models.MODELS
        "kwargs": config_dict.ConfigDict({"features": (32, 64), "hidden": 128,
                                          "dropout": 0.25}),
    })
    c.train = config_dict.ConfigDict({
        "batch_size": 128,
        "num_steps": 500,
        "optimizer": "adamw",
        "learning_rate": 2e-3,
        "lr_schedule": "cosine",
        "warmup_steps": 50,
        "weight_decay": 1e-4,
        "grad_clip": 1.0,
        "momentum": 0.9,  # sgd only
        "label_smoothing": 0.0,
        "log_every": 50,
        "checkpoint_every": 250,
        "keep_checkpoints": 2,
    })
    c.eval = config_dict.ConfigDict({"num_images": 0, "batch_size": 500})
    c.mesh = mesh()
    # One device: these classifiers are tiny (nothing to gain from splitting the CPU), and
    # BatchNorm's many cross-device all-reduces once hung XLA:CPU's collective rendezvous
    # (abort after 40 s) on the heavily shared 2-core machine. Override for accelerators.
    c.mesh.num_devices = 1
    return c


def classifier_smoke(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
    c.model.kwargs.update(features=(4, 8), hidden=16, dropout=0.0)
    c.train.update(batch_size=16, num_steps=3, warmup_steps=1, log_every=1,
                   checkpoint_every=2)
    c.eval.update(num_images=32, batch_size=32)
    return c


def robust_base() -> config_dict.ConfigDict:
    """Defaults of a robust evaluation (``experiments/robust_eval.py``): MNIST models."""
    c = config_dict.ConfigDict()
    c.seed = 0
    c.data = data("mnist", "train", "test[:256]")
    c.data.num_images = 0  # 0: the whole test_split
    c.ddpm = config_dict.ConfigDict({
        "source": "export",  # "export" | "random" | "diffusers"
        "path": "checkpoints/mnist_ddpm",  # export dir or state-dict file (repo-relative)
        "seed": 0,  # init seed of source="random"
        # model + diffusion: used by "random" and "diffusers" (an export carries its own)
        "model": config_dict.ConfigDict({"name": "unet", "config": "mnist",
                                         "overrides": unet_overrides(dropout=0.0, ch=16,
                                                                     num_groups=4)}),
        "diffusion": config_dict.ConfigDict({"schedule": "linear", "num_steps": 1000,
                                             "beta_start": 1e-4, "beta_end": 0.02}),
    })
    c.classifier = config_dict.ConfigDict({
        "source": "export",  # "export" (jaxrob export) | "akamaster" (CIFAR ResNets)
        "path": "checkpoints/mnist_classifier",
    })
    c.purifier = config_dict.ConfigDict({
        "enabled": True,
        "sampler": "ddpm",  # ddpm | ddim | sde | ode
        "t_star": 0.1,
        "num_steps": 10,  # reverse steps (respaced over the first t_star of the chain)
        "stages": config_dict.placeholder(tuple),  # multi-stage: ((t_star, steps), ...)
        "gradient": "exact",  # exact | bpda | surrogate
        "surrogate_steps": config_dict.placeholder(int),
        "variance": "fixed_small",
        "eta": 0.0,
        "remat": True,
    })
    c.attack = config_dict.ConfigDict({
        "name": "pgd",  # none | fgsm | pgd | apgd
        "norm": "linf",
        "eps": 0.3,
        "step_size": config_dict.placeholder(float),  # None: 2.5 eps / num_steps
        "num_steps": 10,
        "random_start": False,
        "num_restarts": 1,
        "loss": "ce",
        "eot_samples": 4,
        "eot_chunk": config_dict.placeholder(int),
    })
    c.eval = config_dict.ConfigDict({
        "protocols": ("one_shot", "worst_of@10"),
        # stochastic | fixed (DW-box: one purifier key per example, attack and scoring) |
        # forward_lock (ADDT's variant: the forward noise fixed per example, reverse fresh)
        "randomness": "stochastic",
        # attack iterates (indices into AttackResult.iterates) scored as extra candidates of a
        # "fixed_aa@N" protocol (the attack then returns its iterates); () = none
        "candidates": (),
        "batch_size": 32,
        "vote_chunk": config_dict.placeholder(int),
        # convergence check: rerun the first num_images with factor x the iterations and
        # eot_factor x the EoT samples in stochastic rows (None: factor); factor None: no check
        "convergence": config_dict.ConfigDict({"factor": config_dict.placeholder(int),
                                               "eot_factor": config_dict.placeholder(int),
                                               "num_images": 64}),
    })
    c.fast_vjp = True  # reverse-mode twins of the models (jaxrob.models._conv)
    c.mesh = mesh(cpu_ynn="no_conv")  # not "off": docs/known_faults.md
    c.rows = ()  # nested dicts {"name": ..., "purifier": {...}, ...}; () = one row "base"
    return c


def robust_eval_options(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
    """Add, in place, the options that only ``experiments/robust_eval.py`` reads: AutoAttack rows
    (``attack.autoattack``, used when ``attack.name == "autoattack"``), DiffAttack's loss
    (``attack.diffattack``, used when ``attack.loss == "diffattack"``), the soundness checks
    (``eval.soundness``, off while ``num_images`` is None) and ``only_rows``. Not in
    :func:`robust_base`: the studies built on it fingerprint their whole ``config.attack``, and
    their records must resume."""
    c.attack.autoattack = config_dict.ConfigDict({
        "version": "standard",  # standard | plus | rand | custom (jaxrob.attacks.autoattack)
        "attacks": config_dict.placeholder(tuple),  # custom: names of jaxrob.attacks.AA_ATTACKS
        "n_target_classes": 9,  # APGD-T / FAB-T targets
        "n_queries": 5000,  # Square's budget per image
        "eot_samples": config_dict.placeholder(int),  # None: 20 for rand, else 1
    })  # iterations: attack.num_steps; radius and norm: attack.eps / attack.norm
    # DiffAttack (Kang et al.): with attack.loss="diffattack", PGD / APGD maximise
    # base + weight x the deviated-reconstruction term (jaxrob.attacks.diffattack_loss)
    c.attack.diffattack = config_dict.ConfigDict({
        "base": "ce",  # ce | dlr | cw
        "weight": 1.0,  # the paper's lambda
        "num_states": config_dict.placeholder(int),  # chain states per evaluation; None: all
    })
    c.eval.soundness = config_dict.ConfigDict({
        "num_images": config_dict.placeholder(int),  # None: off; else the row's first images
        "checks": ("large_eps", "iterations", "gradient_free", "transfer", "flags"),
        "protocol": config_dict.placeholder(str),  # None: the first of eval.protocols
        "large_eps": config_dict.placeholder(float),  # None: Linf 0.5 / L2 0.5 sqrt(dim)
        "large_eps_accuracy": 0.1,  # the robust accuracy at large_eps that passes
        "factor": 4,  # iterations of the stronger run (x num_steps)
        "eot_factor": config_dict.placeholder(int),  # its EoT multiple (None: factor)
        "square_queries": 1000,
    })
    # a subset of config.rows to run now (comma-separated names; "" = all): the other rows'
    # finished records in the workdir stay in results.json and table.md
    c.only_rows = ""
    return c


def use_digits(c: config_dict.ConfigDict, test_split: str) -> config_dict.ConfigDict:
    """Point a ``robust_base``-style config at the bundled 8x8 digits and the committed digits
    DDPM and classifier (``checkpoints/digits_*``), in place."""
    c.data = data("digits", "train", test_split)
    c.data.num_images = 0
    c.ddpm.path = "checkpoints/digits_ddpm"
    c.ddpm.model.config = "digits"
    if "classifier" in c:
        c.classifier.path = "checkpoints/digits_classifier"
    return c


def autoattack_classifier(c: config_dict.ConfigDict, test_split: str) -> config_dict.ConfigDict:
    """Make a robust-evaluation config (with :func:`robust_eval_options`) one row, in place:
    AutoAttack standard with the original's budgets (100 iterations, 9 target classes, 5000
    Square queries) on the classifier alone, ``test_split``, batch 250, scored one-shot."""
    c.data.test_split = test_split
    c.data.num_images = 0
    c.attack.update(name="autoattack", num_steps=100, eot_samples=1)
    c.attack.autoattack.update(version="standard", n_target_classes=9, n_queries=5000)
    c.eval.update(protocols=("one_shot",), batch_size=250)
    c.rows = ({"name": "classifier_aa", "purifier": {"enabled": False}},)
    return c


def robust_smoke(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
    """Shrink a robust evaluation to seconds: random tiny UNet, 8 images, 2 steps."""
    c.ddpm.source = "random"
    c.ddpm.model.overrides = unet_overrides(dropout=0.0, ch=8, ch_mult=(1,), num_res_blocks=1,
                                            attn_resolutions=(), num_groups=4)
    c.purifier.num_steps = 2
    c.attack.update(num_steps=2, eot_samples=2)
    c.eval.update(protocols=("one_shot", "worst_of@2"), batch_size=8)
    c.data.num_images = 8
    return c


# ----------------------------------------------------------------------------- ADDT fine-tuning

# The paper's ablations (experiments/train_addt.py): full ADDT (CGPO + RBGM), CGPO with the
# reference's Linf PGD step instead of RBGM (train_ADDT_linf.py), and the control run of the same
# length on plain Gaussian noise (train_clean.py).
ADDT_VARIANTS = ("addt", "no_rbgm", "no_cgpo")


def parse_variant(arg: str | None, variants=ADDT_VARIANTS) -> tuple[str, bool]:
    """``file.py:<variant>``, ``:<variant>,smoke`` or ``:smoke`` -> ``(variant, smoke)``; the
    first of ``variants`` when none is named. Raises on anything else."""
    tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
    named = [t for t in tokens if t != "smoke"]
    if len(named) > 1 or tokens.count("smoke") > 1 or (named and named[0] not in variants):
        raise ValueError(f"config variant: expected one of {list(variants)}, optionally with "
                         f"',smoke' (e.g. --config configs/digits_addt.py:{variants[-1]},smoke), "
                         f"got {arg!r}")
    return (named[0] if named else variants[0]), "smoke" in tokens


def addt_base(variant: str) -> config_dict.ConfigDict:
    """Defaults of an ADDT fine-tune (``experiments/train_addt.py``): the committed digits DDPM
    against the committed digits classifier, with the reference's hyper-parameters
    (LYMDLUT/ADDT ``train_DDPM_DDIM_ADDT``: AdamW lr 2e-4, betas (0.95, 0.999), weight decay
    1e-6 on every parameter, global-norm clip 1.0, EMA 0.9999 with a power-3/4 warm-up,
    lambda 0.03 clipped to [0, 0.3], K = 5 CGPO iterations)."""
    if variant not in ADDT_VARIANTS:
        raise ValueError(f"config variant: expected one of {list(ADDT_VARIANTS)}, got "
                         f"{variant!r}")
    c = config_dict.ConfigDict()
    c.seed = 0
    c.data = data("digits", "train", "test")
    c.ddpm = config_dict.ConfigDict({
        "path": "checkpoints/digits_ddpm",  # the export fine-tuned (repo-relative or absolute)
        # dropout of the fine-tune's training passes (None: the export's own; the reference
        # fine-tunes Ho et al.'s CIFAR-10 model with its 0.1)
        "dropout": config_dict.placeholder(float),
    })
    c.classifier = config_dict.ConfigDict({"path": "checkpoints/digits_classifier"})
    c.addt = config_dict.ConfigDict({
        "variant": variant,  # addt (mapping "rbgm") | no_rbgm ("pgd_linf") | no_cgpo ("gaussian")
        "num_iters": 5,  # CGPO iterations K (all variants but no_cgpo)
        "lambda_unit": 0.03,  # r_n = clip(lambda_unit sqrt(abar_n / (1 - abar_n)), min, max)
        "lambda_min": 0.0,
        "lambda_max": 0.3,
        "clip_x0": False,  # the reference feeds the classifier the unclipped x0 estimate
        "share_noise": False,  # a fresh forward noise in every CGPO iteration (the reference)
        "linf_eps": 8 / 255,  # no_rbgm only: Linf budget, step and sqrt(snr) clip
        "linf_step": 4 / 255,
        "linf_ratio_max": 10.0,
    })
    c.train = config_dict.ConfigDict({
        # sized for the shared 2-core CPU (an ADDT step is ~K + 1 = 6 UNet forward-backward
        # passes); the reference trains 8 x 32 images a step for 100 CIFAR-10 epochs
        "batch_size": 32,
        "num_steps": 200,
        "learning_rate": 2e-4,
        "b1": 0.95,
        "b2": 0.999,
        "eps": 1e-8,
        "weight_decay": 1e-6,
        "decay_all": True,  # decay biases and norm scales too, as torch.optim.AdamW does
        "grad_clip": 1.0,
        "lr_schedule": "constant",
        "warmup_steps": 0,  # diffusers' "constant" schedule ignores the script's warm-up
        "ema_decay": 0.9999,
        "ema_warmup": True,
        "ema_power": 0.75,
        "log_every": 10,
        "checkpoint_every": 50,
        "keep_checkpoints": 2,
    })
    # after training: eps-MSE, x0-MSE and the classifier's accuracy on the one-step x0 estimate
    # at each t_star, of the base DDPM and of the fine-tune, on the same noise
    c.eval = config_dict.ConfigDict({
        "enabled": True,
        "t_stars": (0.1, 0.3),
        "num_images": 0,  # 0: the whole test split
        "batch_size": 360,
        "seed": 2,
    })
    c.mesh = mesh(cpu_ynn="no_conv")  # not "off": docs/known_faults.md
    return c


def addt_smoke(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
    """Shrink an ADDT fine-tune to seconds of steps (the compilation dominates)."""
    c.train.update(batch_size=16, num_steps=4, log_every=1, checkpoint_every=2)
    c.eval.update(num_images=16, batch_size=16)
    return c
