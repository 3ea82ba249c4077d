"""Memory of one exact-gradient PGD-EoT step versus the number of reverse steps, compiled only.

The issue-16 workload (``benchmarks/accelerator_suite.py``'s ``attack`` section, built by its
builders): one PGD-EoT iteration (EoT 10 in one chunk, batch 8, CE loss of a ``SmallCNN``,
sign step, Linf projection) through ``diffpure(t_star=0.1, num_steps=S)`` of the
35.7M-parameter Ho et al. CIFAR-10 UNet (random weights, 32x32x3), at S = 10, 25, 50, 100
reverse steps, with ``remat=True`` (jaxrob's default: ``jax.checkpoint`` per reverse step) and,
for contrast, without it. ``--ncsnpp`` adds the same step through DiffPure's VP-SDE purifier
(``sampler="sde"``) of score_sde's DDPM++ deep (``cifar10_ddpmpp_deep_continuous``, 106.6M
parameters).

What is measured: XLA's buffer assignment of each compiled program
(``jax.jit(step).lower(...).compile().memory_analysis()``: temp, argument, output, alias bytes;
``accelerator_suite.compiled_memory``), which needs compilation only, no execution. This is
**XLA:CPU's buffer assignment on this machine, not a GPU measurement**: XLA:GPU fuses and
schedules differently, so the absolute numbers differ there; what carries over is whether the
temp memory grows with the number of reverse steps (remat: flat; no remat: linear, the
residuals of every step are kept for the backward pass). ``--fast-compile`` (default on)
compiles with LLVM's optimisation off (``--xla_backend_optimization_level=0``,
``--xla_llvm_disable_expensive_passes``), as the test suite does: these flags act on LLVM's
code generation, after XLA's buffer assignment on the optimised HLO, so the bytes do not
change (checked: the UNet at 10 steps with remat gives the same temp / argument / output bytes
with ``--fast-compile 0``, compiled in 111 s instead of 67 s) and the compile is faster.

Run (repository root; CPU, compile-bound: minutes per program for the full-size UNet)::

    python benchmarks/memory_flatness.py     # UNet: remat 10/25/50/100, no remat 10/25
    python benchmarks/memory_flatness.py --no-unet --ncsnpp --steps 10,100 --append
    python benchmarks/memory_flatness.py --smoke --out /tmp/mem_smoke.json  # tiny, seconds

Output: a table on stdout and ``benchmarks/results/memory_flatness.json`` (``--out``),
rewritten after every program, so a run cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
_FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(HERE, "results", "memory_flatness.json"))
    p.add_argument("--steps", default="10,25,50,100", help="reverse steps with remat")
    p.add_argument("--no-remat-steps", default="10,25", help="reverse steps without remat")
    p.add_argument("--eot", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ncsnpp", action="store_true",
                   help="also the DDPM++ deep VP-SDE purifier (106.6M parameters)")
    p.add_argument("--ncsnpp-steps", default=None,
                   help="reverse steps of the DDPM++ purifier (default: --steps)")
    p.add_argument("--no-unet", action="store_true", help="skip the UNet programs")
    p.add_argument("--fast-vjp", type=int, choices=(0, 1), default=0,
                   help="jaxrob's custom conv VJPs (an XLA:CPU speed-up; default 0: the "
                        "program an accelerator runs)")
    p.add_argument("--fast-compile", type=int, choices=(0, 1), default=1,
                   help="LLVM optimisation off (same buffer assignment, faster compile)")
    p.add_argument("--smoke", action="store_true", help="tiny models: a check of the script")
    p.add_argument("--append", action="store_true",
                   help="keep the rows (and models) of an existing --out with the same settings")
    return p.parse_args(argv)


def _suite_args(a):
    """The ``accelerator_suite`` settings for its builders (``JaxSuite.models``,
    ``JaxSuite._attack_step``)."""
    import accelerator_suite as acc

    s = dict(acc.FULL, **(acc.SMOKE if a.smoke else {}))
    s.update(batch=a.batch, eot_chunk=a.eot, fast_vjp=a.fast_vjp, smoke=a.smoke,
             tiny_model=False, unet_batch=a.batch)
    return argparse.Namespace(**s)


def _ints(text: str | None) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()] if text else []


def main(argv=None) -> dict:
    a = _parse(argv)
    if a.fast_compile:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = " ".join([flags, *(f for f in _FAST_COMPILE
                                                    if f.split("=")[0] not in flags)]).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import accelerator_suite as acc
    import jax
    import jax.numpy as jnp
    import jax.random as jr

    from jaxrob.models import ncsnpp_from_config, random_variables, vp_schedule

    suite = acc.JaxSuite(_suite_args(a), workdir="", save_files=False)
    m = suite.models()
    inp = m["inputs"]
    b = a.batch
    x = jnp.asarray(inp["x01"][:b])
    rest = (m["cv"], x, x, jnp.asarray(inp["y"][:b]), jnp.arange(b, dtype=jnp.uint32),
            jr.key(0))
    result = {"what": "XLA:CPU compiled memory_analysis() of one exact-gradient PGD-EoT step; "
                      "XLA:CPU's buffer assignment, not a GPU measurement",
              "backend": jax.default_backend(), "jax": jax.__version__,
              "machine": platform.processor() or platform.machine(),
              "settings": {"batch": b, "eot": a.eot, "eot_chunk": a.eot, "t_star": acc.T_STAR,
                           "fast_vjp": bool(a.fast_vjp), "fast_compile": bool(a.fast_compile),
                           "xla_flags": os.environ.get("XLA_FLAGS", ""), "smoke": a.smoke,
                           "classifier": f"SmallCNN{tuple(m['clf'].features)}"},
              "models": {}, "rows": []}

    if a.append and os.path.exists(a.out):
        with open(a.out) as f:
            old = json.load(f)
        if old.get("settings") != result["settings"]:
            raise SystemExit(f"--append: {a.out} has other settings: {old.get('settings')}")
        result["models"], result["rows"] = old["models"], old["rows"]

    def write():
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(a.out + ".tmp", a.out)

    programs = []  # (model name, variables, builder kwargs, steps, remat)
    if not a.no_unet:
        result["models"]["unet"] = {"config": "smoke" if a.smoke else acc.FULL["unet"],
                                    "num_params": m["unet_params"], "sampler": "ddpm"}
        programs += [("unet", m["uv"], {}, s, True) for s in _ints(a.steps)]
        programs += [("unet", m["uv"], {}, s, False) for s in _ints(a.no_remat_steps)]
    if a.ncsnpp:
        over = (dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                     image_size=8) if a.smoke else {})
        module = ncsnpp_from_config("cifar10_ddpmpp_deep_continuous", dropout=0.0, **over)
        size = module.image_size
        nv = random_variables(module, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
                              jax.ShapeDtypeStruct((1,), jnp.float32), seed=3)
        n_params = sum(int(v.size) for v in jax.tree.leaves(nv))
        result["models"]["ncsnpp"] = {"config": "cifar10_ddpmpp_deep_continuous"
                                      + (" (smoke)" if a.smoke else ""),
                                      "num_params": n_params, "sampler": "sde"}
        kw = dict(module=module, schedule=vp_schedule(module), sampler="sde")
        steps = _ints(a.ncsnpp_steps) if a.ncsnpp_steps else _ints(a.steps)
        programs += [("ncsnpp", nv, kw, s, True) for s in steps]
        programs += [("ncsnpp", nv, kw, s, False) for s in _ints(a.no_remat_steps)
                     if not a.ncsnpp_steps]
    write()
    for name, variables, kw, steps, remat in programs:
        print(f"[memory_flatness] {name} steps={steps} remat={remat} ...", file=sys.stderr,
              flush=True)
        row = {"model": name, "steps": steps, "remat": remat}
        t0 = time.perf_counter()
        try:
            step, chunk = suite._attack_step(steps, a.eot, remat=remat, **kw)
            compiled = jax.jit(step).lower(variables, *rest).compile()
            row.update(compiled_memory=acc.compiled_memory(compiled), eot_chunk=chunk)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            row["traceback"] = traceback.format_exc(limit=6)[-2000:]
        row["compile_s"] = time.perf_counter() - t0
        row["loadavg_after"] = os.getloadavg()
        result["rows"].append(row)
        _growth(result)
        write()
        print(_table(result), flush=True)
    return result


def _growth(result: dict) -> None:
    """Temp bytes at the longest chain over those at the shortest, per (model, remat)."""
    out = {}
    for r in result["rows"]:
        if not r.get("compiled_memory"):
            continue
        out.setdefault(f"{r['model']}_{'remat' if r['remat'] else 'no_remat'}", []).append(
            (r["steps"], r["compiled_memory"]["temp"]))
    result["temp_growth_longest_over_shortest"] = {
        k: {"steps": [min(v)[0], max(v)[0]], "ratio": max(v)[1] / min(v)[1] if min(v)[1] else None}
        for k, v in out.items() if len(v) > 1}


def _table(result: dict) -> str:
    mb = lambda v: f"{v / 2**20:10.1f}"
    lines = ["model    steps remat    temp MB  argument MB  output MB   total MB  compile s"]
    for r in result["rows"]:
        c = r.get("compiled_memory")
        head = f"{r['model']:8s} {r['steps']:5d} {'yes' if r['remat'] else 'no':5s}"
        if not c:
            lines.append(f"{head} {r.get('error', 'no memory analysis')[:60]}")
            continue
        lines.append(f"{head} {mb(c['temp'])}  {mb(c['argument'])}  {mb(c['output'])} "
                     f"{mb(c['total'])} {r['compile_s']:10.1f}")
    for k, g in result.get("temp_growth_longest_over_shortest", {}).items():
        ratio = "n/a" if g["ratio"] is None else f"x{g['ratio']:.2f}"
        lines.append(f"temp growth {k} {g['steps'][1]}/{g['steps'][0]} steps: {ratio}")
    lines.append("(XLA:CPU buffer assignment from compiled.memory_analysis(); not a GPU "
                 "measurement)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
