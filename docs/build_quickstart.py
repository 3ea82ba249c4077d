"""Write ``docs/quickstart.ipynb`` from the cells below and execute it (outputs saved).

    python docs/build_quickstart.py            # rebuild + execute (about 2-4 min on 2 CPU cores)
    python docs/build_quickstart.py --check    # execute a copy, leave the committed file alone

The cells are the notebook; edit them here so the committed notebook and its outputs always
come from this script. ``tests/test_quickstart.py`` executes the committed notebook top to bottom.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
NOTEBOOK = HERE / "quickstart.ipynb"

CELLS = [
    ("md", """# jaxrob quick start

Load the committed MNIST models, purify, attack the whole pipeline with exact gradients (stochastic
and fixed randomness), score one-shot and worst-of-N, and take the top singular values of the
fixed-key purifier's Jacobian. Runs on a laptop CPU in a few minutes; the datasets folder is
`$JAXROB_DATA_DIR` (default `../shared/datasets` next to the repository)."""),
    ("code", """import os
import pathlib

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import jaxrob

REPO = pathlib.Path.cwd() if (pathlib.Path.cwd() / "checkpoints").is_dir() else pathlib.Path.cwd().parent
os.environ.setdefault("JAXROB_DATA_DIR", str(REPO.parent / "shared" / "datasets"))
print(jax.devices())"""),
    ("md", "## 1. Models: one call each\n`fast_vjp=True` builds the reverse-mode twin (fast input-gradients on CPU; same parameters)."),
    ("code", """ddpm = jaxrob.models.load(REPO / "checkpoints/mnist_ddpm", fast_vjp=True)
clf = jaxrob.models.load(REPO / "checkpoints/mnist_classifier")
print(type(ddpm).__name__, ddpm.num_params, "params;", ddpm.schedule.num_steps, "step schedule")
print(type(clf).__name__, clf.num_params, "params")

test = jaxrob.data.load_dataset("mnist", "test[:8]")
x, y = jnp.asarray(test.images), jnp.asarray(test.labels)
print(x.shape, y)"""),
    ("md", "## 2. Purify\nA purifier is `purify(x, key)`; `DefendedModel` puts the classifier behind it (the `logits_fn(x, key)` every attack takes)."),
    ("code", """purifier = jaxrob.purify.diffpure(ddpm, t_star=0.1, num_steps=10)
defended = jaxrob.purify.DefendedModel(clf, purifier)
keys = jaxrob.purify.example_keys(jr.key(0), test.indices)   # one key per example
x_pur = purifier(x, keys)
print("purified accuracy:", float(jnp.mean(defended(x, keys).argmax(-1) == y)))
print("mean |x_pur - x|:", float(jnp.abs(x_pur - x).mean()))"""),
    ("md", "## 3. Attack with exact gradients\nStochastic: fresh purifier noise at every EoT sample. Fixed randomness (DW-box): the attacker knows and reuses the purifier's key."),
    ("code", """res = jaxrob.attacks.pgd(defended, x, y, jr.key(1), eps=0.3, num_steps=5, eot_samples=2)
print("stochastic: loss", np.round(np.asarray(res.loss), 2), "| one fresh purification correct:",
      (defended(res.x_adv, jr.key(2)).argmax(-1) == y).tolist())

fixed_keys = jaxrob.evaluation.fixed_purifier_keys(jr.key(0), test.indices)
fixed = jaxrob.purify.FixedRandomness(defended, fixed_keys)
res_fixed = jaxrob.attacks.pgd(fixed, x, y, jr.key(1), eps=0.3, num_steps=5)
print("fixed: correct after attack:", (fixed(res_fixed.x_adv).argmax(-1) == y).tolist())"""),
    ("md", "## 4. Score: one-shot and worst-of-N\n`evaluate_robustness` attacks every example alone (per-example keys), then scores fresh purifications; the record does not depend on batch size or devices."),
    ("code", """import functools

attack = functools.partial(jaxrob.attacks.pgd, eps=0.3, num_steps=5, eot_samples=2)
out = jaxrob.evaluation.evaluate_robustness(
    defended, attack, test.images, test.labels, test.indices, key=jr.key(0),
    protocols=("one_shot", "worst_of@4"), batch_size=8, progress=False)
for which in ("clean", "adv"):
    for p, s in out[which].items():
        print(f"{which:5s} {p:10s} {100 * s['accuracy']:5.1f}%  95% CI {[round(100 * v, 1) for v in s['ci95']]}")"""),
    ("md", "## 5. Why it is robust: the fixed-key purifier's Jacobian\nTop singular values of $J = \\partial\\, \\mathrm{purify}(x, k) / \\partial x$, matrix-free (Lanczos on $J^T J$, reverse mode)."),
    ("code", """k0 = fixed_keys[0]
f = lambda v: purifier(v, k0)
sv, err = jaxrob.analysis.top_singular_values(f, x[:1], k=5, key=jr.key(3), ad="vjp",
                                              return_residuals=True)
print("top singular values:", np.round(np.asarray(sv), 3), "error bounds:", np.asarray(err))"""),
]


def build():
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md"
                else nbformat.v4.new_code_cell(src) for kind, src in CELLS]
    return nb


def execute(nb, cwd: pathlib.Path, timeout: int = 900):
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(cwd)}}).execute()
    for cell in nb.cells:  # XLA's "slow compile" alarms on a busy machine are not results
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs
                            if not (o.get("name") == "stderr"
                                    and "slow_operation_alarm" in o.get("text", ""))]
    return nb


def main(argv=None) -> int:
    import nbformat

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="execute without writing")
    args = ap.parse_args(argv)
    nb = execute(build(), HERE)
    if not args.check:
        nbformat.write(nb, NOTEBOOK)
        print(f"wrote {NOTEBOOK}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
