"""Is ΔW low-rank on your fine-tune? The LoRA paper's section 7 over every adapted layer.

    python -m minilora.analyze --adapter out/qs/adapters/sql-r8 --adapter2 out/qs/adapters/sql-r64 \\
                               --full out/qs/runs/sql-full --plot out/qs/analysis

--base is the model the fine-tunes started from (default: the one the adapter or the full run
names). For each layer and target it prints:

  spectrum        the share of ‖ΔW‖²_F in the top k singular directions (k = --top_k) and the
                  effective rank, for each adapter (ΔW = scaling · B A, DoRA: merged W − W) and
                  for the full fine-tune (ΔW = W_tuned − W_base)
  subspaces       φ between the two adapters' A (the paper's Figure 3: do r=8 and r=64 learn the
                  same top directions?) and between each adapter's ΔW and the full fine-tune's
                  (do LoRA and full fine-tuning move the same input directions?); beside them the
                  value random subspaces would give, max(i, j)/d
  amplification   ‖ΔW‖_F / ‖Uᵀ W Vᵀ‖_F at the adapter's rank (the paper's Table 7)

--plot DIR writes spectrum.png (cumulative energy against k) and phi.png (φ heat maps, one per
layer, like Figure 3); it needs matplotlib (`pip install -e ".[plot]"`), and without it the
tables are printed alone with a hint. --json FILE keeps every figure.
"""

import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from minilora.adapter_files import load_adapter
from minilora.analysis import (adapter_deltas, amplification_factor, full_deltas, random_similarity, similarity_grid,
                               spectrum, subspace_similarity)
from minilora.cli import main_guard, opt, parse_args
from minilora.errors import MiniloraError
from minilora.fileio import atomic_open
from minilora.loading import adapter_base, load_model, read_run_info
from minilora.plot import PLOT_HINT, pyplot, save_figure


@dataclass
class Args:
    """Measure how low-rank the weight change of a fine-tune is (the LoRA paper's section 7)."""
    adapter: Optional[str] = opt(None, "an adapter directory (train.py output or PEFT format)")
    adapter2: Optional[str] = opt(None, "a second adapter of the same base (e.g. another rank) to compare with")
    full: Optional[str] = opt(None, "a fully fine-tuned model directory of the same base (train.py --lora_r 0)")
    base: Optional[str] = opt(None, "the base model (default: the one --adapter or --full names)")
    top_k: list[int] = opt([1, 2, 4, 8, 16], "k for the spectrum's energy columns and φ(k, k)")
    plot: Optional[str] = opt(None, "write spectrum.png and phi.png to this directory (needs matplotlib)")
    json: Optional[str] = opt(None, "write every figure to this JSON file")

    def __post_init__(self):
        if not (self.adapter or self.adapter2 or self.full):
            raise MiniloraError("nothing to analyse: pass --adapter (and --adapter2) and/or --full")
        if self.adapter2 and not self.adapter:
            raise MiniloraError("--adapter2 is compared with --adapter; pass --adapter first")
        if not self.top_k or any(k < 1 for k in self.top_k):
            raise MiniloraError(f"--top_k must be positive ints, got {self.top_k}")


def resolve_base(args):
    if args.base:
        return args.base
    if args.adapter:
        return adapter_base(args.adapter, flag="--base")
    info = read_run_info(args.full)
    if info is None:
        raise MiniloraError(f"{args.full} has no minilora.json naming its base; pass --base")
    return info.base_model


def label(path):
    return os.path.basename(os.path.normpath(path)) or path


# ---- the measurements ------------------------------------------------------------------------------

def analyze(base, adapters, full=None, top_k=(1, 2, 4, 8, 16)):
    """Every figure, per layer: {"layers": {path: {...}}, "sources": {label: rank or None}, ...}.

    base: the base GPT; adapters: {label: adapter directory} (at most two, loaded onto base);
    full: a fully fine-tuned GPT of the same shape, or None.
    """
    names = {}
    for i, (lab, path) in enumerate(adapters.items()):
        names[lab] = f"adapter{i + 1}"
        load_adapter(base, path, adapter_name=names[lab])
    deltas = {lab: adapter_deltas(base, name) for lab, name in names.items()}
    ranks = {lab: base.peft_config[name].r for lab, name in names.items()}
    paths = list(dict.fromkeys(p for d in deltas.values() for p in d))  # model order, union of the adapters'
    if full is not None:
        fd = full_deltas(base, full, paths or None)
        paths = paths or list(fd)
        deltas["full"] = {p: (W, dW, None) for p, (W, dW) in fd.items()}
        ranks["full"] = None
    amp_r = min((r for r in ranks.values() if r), default=8)  # the full fine-tune's amplification at the adapters' rank
    labs = list(adapters)
    out = {"sources": ranks, "top_k": list(top_k), "layers": {}}
    for p in paths:
        row = {"spectrum": {}, "amplification": {}, "phi": {}}
        d_in = None
        for src, per_path in deltas.items():
            if p not in per_path:
                continue
            W, dW, _ = per_path[p]
            d_in = dW.shape[1]
            s = spectrum(dW)
            row["spectrum"][src] = {"energy": {k: s.energy(k) for k in top_k}, "effective_rank": s.effective_rank,
                                    "rank_90": s.rank_for(0.9), "norm": math.sqrt(s.total_energy),
                                    "singular_values": s.singular_values.tolist()}
            a = amplification_factor(W, dW, min(ranks[src] or amp_r, min(dW.shape)))
            row["amplification"][src] = vars(a)
        if len(labs) == 2 and all(p in deltas[lab] for lab in labs):  # φ between the two adapters' A (Figure 3)
            A1, A2 = deltas[labs[0]][p][2], deltas[labs[1]][p][2]
            r = min(ranks[labs[0]], ranks[labs[1]])
            row["phi"][f"{labs[0]} vs {labs[1]}"] = {k: subspace_similarity(A1, A2, k, k) for k in top_k if k <= r}
            row["phi_grid"] = similarity_grid(A1, A2).tolist()
        if full is not None:  # φ between each adapter's ΔW and the full fine-tune's, input directions
            for lab in labs:
                if p in deltas[lab]:
                    r = ranks[lab]
                    row["phi"][f"{lab} vs full"] = {k: subspace_similarity(deltas[lab][p][1], deltas["full"][p][1], k, k)
                                                    for k in top_k if k <= r}
        row["random_phi"] = {k: random_similarity(k, k, d_in) for k in top_k}
        out["layers"][p] = row
    return out


# ---- tables ----------------------------------------------------------------------------------------

def table(headers, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def report(result):
    """The three tables as text."""
    top_k, parts = result["top_k"], []
    rows = []
    for p, row in result["layers"].items():
        for src, s in row["spectrum"].items():
            rows.append([p, src, *(f"{s['energy'][k]:.3f}" for k in top_k), f"{s['effective_rank']:.1f}",
                         s["rank_90"], f"{s['norm']:.3g}"])
    parts.append("share of ‖ΔW‖²_F in the top k singular directions, effective rank (Roy & Vetterli), "
                 "directions for 90% of the energy\n" +
                 table(["layer", "ΔW of", *(f"k={k}" for k in top_k), "eff. rank", "k@90%", "‖ΔW‖_F"], rows))
    pairs = list(dict.fromkeys(pair for row in result["layers"].values() for pair in row["phi"]))
    if pairs:
        rows = []
        for p, row in result["layers"].items():
            shown = [pair for pair in pairs if pair in row["phi"]]
            for pair in shown:
                phi = row["phi"][pair]
                rows.append([p, pair, *(f"{phi[k]:.3f}" if k in phi else "" for k in top_k)])
            if shown:
                longest = max(len(row["phi"][pair]) for pair in shown)
                rows.append([p, "random", *(f"{row['random_phi'][k]:.3f}" if i < longest else ""
                                            for i, k in enumerate(top_k))])
        parts.append("subspace similarity φ(i=k, j=k) of the top-k input directions (1 = the same subspace, 0 = "
                     "orthogonal; 'random': what random subspaces give, max(i, j)/d)\n" +
                     table(["layer", "compared", *(f"k={k}" for k in top_k)], rows))
    rows = []
    for p, row in result["layers"].items():
        for src, a in row["amplification"].items():
            r = result["sources"][src] or min((v for v in result["sources"].values() if v), default=8)
            rows.append([p, src, r, f"{a['factor']:.2f}", f"{a['delta_norm']:.3g}", f"{a['projected_norm']:.3g}",
                         f"{a['weight_norm']:.3g}"])
    parts.append("amplification ‖ΔW‖_F / ‖Uᵀ W Vᵀ‖_F with U, V the top-r singular vectors of ΔW (the paper's Table 7)\n" +
                 table(["layer", "ΔW of", "r", "factor", "‖ΔW‖_F", "‖UᵀWVᵀ‖_F", "‖W‖_F"], rows))
    return "\n\n".join(parts)


# ---- pictures --------------------------------------------------------------------------------------

def _grid(n):
    cols = min(n, 6)
    return math.ceil(n / cols), cols


def plot_spectra(plt, result, path):
    """Cumulative share of ‖ΔW‖²_F against k, one panel per source, one line per layer."""
    sources = list(result["sources"])
    fig, axes = plt.subplots(1, len(sources), figsize=(5 * len(sources), 4), squeeze=False)
    for ax, src in zip(axes[0], sources):
        for p, row in result["layers"].items():
            if src in row["spectrum"]:
                sv = torch.tensor(row["spectrum"][src]["singular_values"]).pow(2)
                cum = (sv.cumsum(0) / sv.sum().clamp(min=1e-300)).tolist()
                ax.plot(range(1, len(cum) + 1), cum, lw=1, label=p.removeprefix("transformer."))
        r = result["sources"][src]
        if r:
            ax.axvline(r, color="grey", ls=":", lw=1)
        ax.set(xscale="log", xlabel="k (singular directions)", ylabel="share of ‖ΔW‖²_F", ylim=(0, 1.02),
               title=f"ΔW of {src}" + (f" (r={r})" if r else ""))
        ax.grid(alpha=0.3)
    if len(result["layers"]) <= 12:
        axes[0][-1].legend(fontsize=7)
    save_figure(plt, fig, path)


def plot_phi(plt, result, path):
    """φ(i, j) between the two adapters for every i, j, one heat map per layer (the paper's Figure 3)."""
    layers = [(p, row["phi_grid"]) for p, row in result["layers"].items() if "phi_grid" in row]
    if not layers:
        return False
    nrows, ncols = _grid(len(layers))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.8 * nrows), squeeze=False, layout="constrained")
    a, b = [s for s in result["sources"] if s != "full"][:2]
    for ax, (p, grid) in zip(axes.flat, layers):
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower",
                       extent=(0.5, len(grid[0]) + 0.5, 0.5, len(grid) + 0.5))
        ax.set_title(p.removeprefix("transformer."), fontsize=8)
        ax.set_xlabel(f"j ({b})", fontsize=7)
        ax.set_ylabel(f"i ({a})", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # i and j count directions
        ax.yaxis.set_major_locator(plt.MaxNLocator(integer=True))
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="φ(i, j)")
    save_figure(plt, fig, path)
    return True


def main(argv=None):
    args = parse_args(Args, argv)
    base_name = resolve_base(args)
    base, _ = load_model(base_name)
    full = load_model(args.full)[0] if args.full else None
    adapters = {label(p): p for p in (args.adapter, args.adapter2) if p}
    if len(adapters) < len([p for p in (args.adapter, args.adapter2) if p]):
        adapters = {f"{i + 1}:{label(p)}": p for i, p in enumerate((args.adapter, args.adapter2))}
    with torch.no_grad():
        result = analyze(base, adapters, full, tuple(args.top_k))
    print(f"base {base_name}; ΔW of " + ", ".join(f"{s} (r={r})" if r else s for s, r in result["sources"].items()))
    print(report(result))
    if args.json:
        with atomic_open(args.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        print(f"\nwrote {args.json}")
    if args.plot:
        plt = pyplot()
        if plt is None:
            print(f"\n--plot: {PLOT_HINT}; the tables above hold the same figures", file=sys.stderr)
            return result
        plot_spectra(plt, result, os.path.join(args.plot, "spectrum.png"))
        wrote = ["spectrum.png"] + (["phi.png"] if plot_phi(plt, result, os.path.join(args.plot, "phi.png")) else [])
        print(f"\nwrote {', '.join(wrote)} to {args.plot}")
    else:
        print("\n(--plot DIR draws the spectra and the φ heat maps)")
    return result


if __name__ == "__main__":
    main_guard(main)
