"""Markdown tables of ``experiments/protect_eval.py``'s ``results.json``.

    python experiments/protect_table.py runs/mnist_protect/results.json

Tables: (1) edit quality of the LDM's and the PDM's SDEdit of protected images against the
clean image's edit (FID on the MNIST classifier's features, not Inception-FID; SSIM; PSNR;
classifier accuracy on the edit); (2) protection removal: the LDM edit after no purification,
PDM-Pure, JPEG and crop-and-resize; (3) the encoder's amplification; (4) the adaptive attack.
"""

from __future__ import annotations

import json
import pathlib
import sys

PIPELINE_NAMES = {"ldm": "LDM edit", "pdm": "PDM edit", "pdm_pure": "PDM-Pure + LDM",
                  "jpeg": "JPEG + LDM", "crop": "crop + LDM"}
METHOD_NAMES = {"none": "clean", "advdm": "AdvDM", "advdm-": "AdvDM(-)", "sds+": "SDS(+)",
                "sds-": "SDS(-)", "photoguard": "PhotoGuard", "mist": "Mist",
                "pdm_advdm": "AdvDM on PDM", "pdm_sdedit": "PDM SDEdit (e2e)",
                "adaptive": "adaptive (PDM-Pure+LDM)"}


def _f(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def _cell(row) -> str:
    """``FID / SSIM / PSNR / acc``."""
    if row is None:
        return "-"
    return (f"{_f(row.get('fid'), 1)} / {_f(row['ssim'])} / {_f(row['psnr'], 1)} / "
            f"{_f(row['accuracy'])}")


def _keyed(results):
    rows = {}
    order = []
    for r in results["rows"]:
        k = (r["method"], r["eps_name"])
        if k not in order:
            order.append(k)
        rows[(r["method"], r["eps_name"], r["pipeline"])] = r
    return rows, order


def format_tables(results: dict) -> str:
    """The four markdown tables of a ``results.json`` (a dict)."""
    rows, order = _keyed(results)
    out = [f"{results.get('num_images')} MNIST test images; cells: FID (classifier features, "
           "not Inception) / SSIM / PSNR (dB) / classifier accuracy on the edit, each against "
           "the clean image's edit by the same editor. Clean-image accuracy: "
           f"{_f(results.get('clean_accuracy'))}.", ""]

    def table(title, pipes, methods_filter):
        out.extend([f"**{title}**", "",
                    "| protection | eps | " + " | ".join(PIPELINE_NAMES[p] for p in pipes)
                    + " |", "|---|---|" + "---|" * len(pipes)])
        for m, e in order:
            if not methods_filter(m):
                continue
            cells = [_cell(rows.get((m, e, p))) for p in pipes]
            out.append(f"| {METHOD_NAMES.get(m, m)} | {e} | " + " | ".join(cells) + " |")
        out.append("")

    table("Edit quality: LDM vs PDM", ["ldm", "pdm"], lambda m: m != "adaptive")
    table("Protection removal (then the LDM edit)", ["ldm", "pdm_pure", "jpeg", "crop"],
          lambda m: True)
    amp = results.get("amplification") or []
    if amp:
        out.extend(["**Encoder amplification** (||E(x_p) - E(x)||_2 / ||x_p - x||_2, scaled "
                    "codes; random: a Gaussian direction of the same pixel norm)", "",
                    "| protection | eps | pixel L2 | latent L2 | ratio | ratio random | "
                    "protection / random |", "|---|---|---|---|---|---|---|"])
        for a in amp:
            out.append(f"| {METHOD_NAMES.get(a['method'], a['method'])} | {a['eps_name']} | "
                       f"{_f(a.get('pixel_l2'))} | {_f(a.get('latent_l2'))} | "
                       f"{_f(a.get('ratio'))} | {_f(a.get('ratio_random'))} | "
                       f"{_f(a.get('amplification'))} |")
        out.append("")
    return "\n".join(out)


def main(argv) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: python experiments/protect_table.py RESULTS_JSON")
    print(format_tables(json.loads(pathlib.Path(argv[1]).read_text())))


if __name__ == "__main__":
    main(sys.argv)
