"""Study ``manual-bn``: BatchNorm from scratch (bnstudy.reference) against ``nn.BatchNorm1d``, the seed blog's
worked example recomputed, and histograms of a sample before and after BN."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from bnstudy import reference as ref
from bnstudy.studies.result import DEFAULT_SEEDS, Check, StudyResult, choose_params, mean_std

NAME = "manual-bn"
WORKED_INPUT = [[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], [[7.0, 8.0, 9.0], [10.0, 11.0, 12.0]]]
BLOG_MEAN = [4.5, 6.5, 8.5]
BLOG_VAR = [8.25, 8.25, 8.25]
LAYER_AFFINE = ((1.0, 0.0), (1.0, 0.0), (0.8, -0.2))
READING = (
    "The (2, 2, 3) input is 4 rows of 3 channels (reshaped to (4, 3), as nn.BatchNorm1d(3) needs); each channel "
    "is normalised over its 4 values. Three layers of BN → ReLU act on it in turn: layers 1 and 2 with γ = 1, "
    "β = 0 (PyTorch's initial values; the blog gives no others), layer 3 with γ = 0.8, β = −0.2; ε = 1e-5."
)


@dataclass(frozen=True)
class Params:
    eps: float = 1e-5
    momentum: float = 0.1
    hist_mean: float = 50.0
    hist_std: float = 10.0
    hist_size: int = 4096
    hist_gamma: float = 12.0
    hist_beta: float = 40.0
    equivalence_steps: int = 3
    tolerance: float = 1e-6


def worked_input() -> Tensor:
    """The blog's (2, 2, 3) tensor as the (4, 3) batch BN sees, in float64."""
    return torch.tensor(WORKED_INPUT, dtype=torch.float64).reshape(-1, 3)


def three_layer_example(
    x: Tensor, layers: Sequence[tuple[float, float]] = LAYER_AFFINE, eps: float = 1e-5
) -> list[dict[str, list]]:
    """Each layer's batch statistics, normalised values, affine output and ReLU output, from bnstudy.reference."""
    rows = []
    for gamma, beta in layers:
        g = torch.full((x.shape[1],), gamma, dtype=x.dtype)
        b = torch.full((x.shape[1],), beta, dtype=x.dtype)
        cache = ref.bn_train_forward(x, g, b, eps)
        out = cache.y.relu()
        rows.append(
            {
                "gamma": gamma,
                "beta": beta,
                "mean": cache.mean.tolist(),
                "var": cache.var.tolist(),
                "x_hat": cache.x_hat.tolist(),
                "bn_out": cache.y.tolist(),
                "relu_out": out.tolist(),
            }
        )
        x = out
    return rows


def torch_three_layers(x: Tensor, layers: Sequence[tuple[float, float]] = LAYER_AFFINE, eps: float = 1e-5) -> Tensor:
    """The same three layers as nn.BatchNorm1d → nn.ReLU in train mode; returns each layer's ReLU output."""
    outs = []
    for gamma, beta in layers:
        bn = nn.BatchNorm1d(x.shape[1], eps=eps).to(x.dtype)
        with torch.no_grad():
            bn.weight.fill_(gamma)
            bn.bias.fill_(beta)
        x = bn(x).relu().detach()
        outs.append(x)
    return torch.stack(outs)


def blog_statistics_readings(x: Tensor) -> list[dict]:
    """Mean and biased variance of the (2, 2, 3) input under every choice of reduced dims, to see whether any
    reading of the input gives the blog's μ_B and σ²_B."""
    readings = []
    for r in range(1, x.dim() + 1):
        for dims in itertools.combinations(range(x.dim()), r):
            mean, var = x.mean(dim=dims), x.var(dim=dims, unbiased=False)
            readings.append({"dims": list(dims), "mean": mean.flatten().tolist(), "var": var.flatten().tolist()})
    return readings


def _matches_blog(reading: dict) -> bool:
    return set(BLOG_MEAN) <= set(reading["mean"]) and set(BLOG_VAR) <= set(reading["var"])


def worked_example(eps: float = 1e-5) -> dict:
    """The blog's example, recomputed: correct statistics beside the blog's, and what the blog's would output."""
    x = worked_input()
    layers = three_layer_example(x, eps=eps)
    blog_mean = torch.tensor(BLOG_MEAN, dtype=torch.float64)
    blog_var = torch.tensor(BLOG_VAR, dtype=torch.float64)
    blog_x_hat = ref.normalize(x, blog_mean, blog_var, eps)
    return {
        "reading": READING,
        "input": x.tolist(),
        "blog": {
            "mean": BLOG_MEAN,
            "var": BLOG_VAR,
            "x_hat": blog_x_hat.tolist(),
            "x_hat_mean": ref.batch_mean(blog_x_hat).tolist(),
            "x_hat_var": ref.batch_var(blog_x_hat).tolist(),
        },
        "layers": layers,
        "torch_relu_out": torch_three_layers(x, eps=eps).tolist(),
        "readings": blog_statistics_readings(torch.tensor(WORKED_INPUT, dtype=torch.float64)),
    }


def histogram_stages(seed: int, p: Params) -> dict[str, Tensor]:
    """A N(mean, std²) sample before BN, after normalisation, and after the affine step (one channel)."""
    gen = torch.Generator().manual_seed(seed)
    x = (p.hist_mean + p.hist_std * torch.randn(p.hist_size, 1, generator=gen, dtype=torch.float64)).float()
    x_hat = ref.normalize(x, ref.batch_mean(x), ref.batch_var(x), p.eps)
    y = ref.scale_shift(x_hat, torch.tensor([p.hist_gamma]), torch.tensor([p.hist_beta]))
    return {"before": x.flatten(), "normalized": x_hat.flatten(), "affine": y.flatten()}


def histogram(values: Tensor, bins: int = 60) -> dict[str, list[float]]:
    """Bin counts and edges, so results hold the histogram rather than every sample."""
    counts, edges = torch.histogram(values.double(), bins=bins)
    return {"counts": counts.tolist(), "edges": edges.tolist()}


def _max_err(a: Tensor, b: Tensor) -> float:
    """Largest difference, relative to the expected values' magnitude where that exceeds 1 (float32 sums of
    many terms cannot agree to 1e-6 absolutely)."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=1)).item()


def equivalence(seed: int, shape: tuple[int, ...], dtype: torch.dtype, p: Params) -> dict[str, float]:
    """Largest differences between bnstudy.reference and nn.BatchNorm1d: train-mode outputs and gradients,
    running statistics after ``equivalence_steps`` batches, and eval-mode outputs."""
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    bn = nn.BatchNorm1d(c, eps=p.eps, momentum=p.momentum).to(dtype)
    with torch.no_grad():
        bn.weight.copy_(0.5 + torch.rand(c, generator=gen, dtype=dtype))
        bn.bias.copy_(torch.randn(c, generator=gen, dtype=dtype))
    gamma, beta = bn.weight.detach().clone(), bn.bias.detach().clone()
    running_mean, running_var = torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype)
    errors = {"output": 0.0, "grad_input": 0.0, "grad_gamma": 0.0, "grad_beta": 0.0}
    for _ in range(p.equivalence_steps):
        x = (3.0 * torch.randn(shape, generator=gen, dtype=dtype) + 2.0).requires_grad_(True)
        dy = torch.randn(shape, generator=gen, dtype=dtype)
        bn.zero_grad()
        y = bn(x)
        y.backward(dy)
        cache = ref.bn_train_forward(x.detach(), gamma, beta, p.eps)
        dx, dgamma, dbeta = ref.bn_backward(dy, cache, gamma)
        for key, a, b in (
            ("output", cache.y, y.detach()),
            ("grad_input", dx, x.grad),
            ("grad_gamma", dgamma, bn.weight.grad),
            ("grad_beta", dbeta, bn.bias.grad),
        ):
            errors[key] = max(errors[key], _max_err(a, b))
        running_mean, running_var = ref.update_running_stats(
            running_mean, running_var, cache.mean, cache.var, ref.count_per_channel(x), p.momentum
        )
    errors["running_mean"] = _max_err(running_mean, bn.running_mean)
    errors["running_var"] = _max_err(running_var, bn.running_var)
    x = 3.0 * torch.randn(shape, generator=gen, dtype=dtype) + 2.0
    with torch.no_grad():
        expected = bn.eval()(x)
    errors["eval_output"] = _max_err(ref.bn_eval_forward(x, running_mean, running_var, gamma, beta, p.eps), expected)
    return errors


EQUIVALENCE_CASES = {"(N, C) float64": ((16, 5), torch.float64), "(N, C, L) float64": ((8, 5, 7), torch.float64)}
EQUIVALENCE_CASES_F32 = {"(N, C) float32": ((16, 5), torch.float32), "(N, C, L) float32": ((8, 5, 7), torch.float32)}


def run(seeds: Sequence[int] = DEFAULT_SEEDS, quick: bool | None = None, **overrides) -> StudyResult:
    """Check the from-scratch BN against PyTorch, recompute the blog's example, and histogram BN's stages."""
    p = choose_params(Params(), {}, quick, overrides)
    example = worked_example(p.eps)
    layer1 = example["layers"][0]
    ours = torch.tensor([layer["relu_out"] for layer in example["layers"]], dtype=torch.float64)
    theirs = torch.tensor(example["torch_relu_out"], dtype=torch.float64)

    equiv = {
        case: [equivalence(s, shape, dtype, p) for s in seeds]
        for case, (shape, dtype) in {**EQUIVALENCE_CASES, **EQUIVALENCE_CASES_F32}.items()
    }
    worst = {case: {k: max(e[k] for e in runs) for k in runs[0]} for case, runs in equiv.items()}

    stages = [histogram_stages(s, p) for s in seeds]
    stage_stats = {
        stage: {
            "mean": mean_std([st[stage].mean().item() for st in stages]),
            "std": mean_std([st[stage].std(unbiased=False).item() for st in stages]),
        }
        for stage in ("before", "normalized", "affine")
    }

    def within(case_group: dict) -> bool:
        return all(err <= p.tolerance for case in case_group for err in worst[case].values())

    checks = {
        "matches_torch_float64": Check(
            "reference BN equals nn.BatchNorm1d (outputs, input/γ/β gradients, running stats, eval outputs) "
            f"within {p.tolerance:g} (relative where values exceed 1) in float64",
            within(EQUIVALENCE_CASES),
            {case: worst[case] for case in EQUIVALENCE_CASES},
        ),
        "matches_torch_float32": Check(
            f"the same within {p.tolerance:g} in float32",
            within(EQUIVALENCE_CASES_F32),
            {case: worst[case] for case in EQUIVALENCE_CASES_F32},
        ),
        "worked_example_statistics": Check(
            "the worked example's per-channel mean is [5.5, 6.5, 7.5] and biased variance 11.25",
            max(abs(a - b) for a, b in zip(layer1["mean"] + layer1["var"], [5.5, 6.5, 7.5] + [11.25] * 3)) < 1e-12,
            {"mean": layer1["mean"], "var": layer1["var"]},
        ),
        "three_layers_match_torch": Check(
            "the three-layer example from reference.py equals nn.BatchNorm1d → ReLU ×3 in train mode",
            _max_err(ours, theirs) <= p.tolerance,
            _max_err(ours, theirs),
        ),
        "blog_statistics_wrong": Check(
            "the blog's μ_B, σ²_B are not the input's statistics under any choice of reduced dims, and normalising "
            "with them leaves a non-zero mean",
            not any(_matches_blog(r) for r in example["readings"])
            and max(abs(m) for m in example["blog"]["x_hat_mean"]) > 0.1,
            example["blog"]["x_hat_mean"],
        ),
        "normalized_zero_mean_unit_std": Check(
            "after normalisation the sample has mean 0 and std 1 (up to ε)",
            all(abs(v) < 1e-5 for v in stage_stats["normalized"]["mean"]["values"])
            and all(abs(v - 1) < 1e-4 for v in stage_stats["normalized"]["std"]["values"]),
            stage_stats["normalized"],
        ),
        "affine_sets_mean_and_std": Check(
            f"after the affine step the sample has mean β = {p.hist_beta:g} and std γ = {p.hist_gamma:g}",
            all(abs(v - p.hist_beta) < 1e-3 for v in stage_stats["affine"]["mean"]["values"])
            and all(abs(v - p.hist_gamma) < 1e-3 for v in stage_stats["affine"]["std"]["values"]),
            stage_stats["affine"],
        ),
    }
    summary = {
        "reading": READING,
        "worked_example_mean": layer1["mean"],
        "worked_example_var": layer1["var"],
        "blog_mean": BLOG_MEAN,
        "blog_var": BLOG_VAR,
        "layer3_relu_out": example["layers"][2]["relu_out"],
        "max_error_vs_torch": worst,
        "histogram": stage_stats,
    }
    return StudyResult(
        NAME,
        asdict(p),
        list(seeds),
        summary,
        checks,
        data={"worked_example": example, "histogram_seed0": {k: histogram(v) for k, v in stages[0].items()}},
    )
