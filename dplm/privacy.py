"""DP-SGD pieces: the privacy budget (accountant + cap), Poisson sampling, Opacus wrapping,
the DP metadata mechanisms, and what a run's DP claim says (`NEIGHBOURS`, `PUBLIC_QUANTITIES`).

The accountant is the single source of truth for epsilon. `PrivacyBudget.allows_next_step`
asks it, on a copy, what epsilon would be after one more step, so a run never takes a step
that would pass `max_epsilon`. Opacus is imported where it is used: a run without DP never
loads it.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import secrets
import warnings

import numpy as np
import torch

from dplm.errors import DplmError

PRV_STEP_EPS_ERROR, PRV_RECORD_EPS_ERROR = 0.01, 0.001  # the PRV accountant's error: before each step, reported
# Opacus' RDP warns when its largest order is optimal (tiny epsilons); the bound is still valid.
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")

METADATA_DELTA_SHARE = 0.1  # of privacy.delta, for DP category sets (only when some are estimated)
PUBLIC_QUANTITIES = {
    "column_names_and_kinds": (
        "the table's column names and their order (the synthetic rows' column order), which must match the "
        "schema, and every column's kind, which under DP the schema gives (never read off the data)"
    ),
    "steps": (
        "the number of DP steps: fixed before training by train.max_steps, train.max_epochs and the epsilon "
        "cap (data-independent; train.max_training_time is refused under DP)"
    ),
    "plan": (
        "the settings dplm chose (plan.json): from the DP count of training units, epsilon, delta, the schema's "
        "kinds and given bounds, and the compute budget, measured on dummy rows before the data was read (a "
        "history counts as a fixed number of rows in the budget)"
    ),
    "audit_canaries": "the audit's random records and which of them trained: drawn from the schema, not the data",
}
NEIGHBOURS = ("add/remove one privacy unit: training tables that differ by one unit (a row, or a subject with all "
              "of its rows). No exact count of units is released (only a DP count, counted in epsilon, which sizes "
              "the sampling rate); each unit's side of the holdout split is a keyed draw of that unit alone "
              "(train.seed), so adding or removing a unit moves no other, and held-out units reach nothing that "
              "is released")


def make_accountant(name: str):
    from opacus.accountants import PRVAccountant

    if name == "rdp":
        return rdp_accountant()
    if name == "prv":
        return PRVAccountant()
    raise DplmError(f"privacy.accountant '{name}' is unknown; use 'rdp' or 'prv'")


def rdp_accountant():
    """Opacus' RDP accountant, with the RDP of one step of each (noise, rate) computed once.
    Opacus computes it again for every epsilon asked (a run asks before every step) and then
    multiplies it by the steps; here the same product of the same numbers (identical epsilons),
    without the repeats, which were most of a small DP run's time."""
    return _cached_rdp_class()()


@functools.cache
def _cached_rdp_class():
    """The accountant class of `rdp_accountant`, defined once (Opacus is imported on first use)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    class CachedRDPAccountant(RDPAccountant):
        def get_privacy_spent(self, *, delta: float, alphas=None) -> tuple[float, float]:
            if not self.history:
                return 0, 0
            alphas = tuple(alphas or self.DEFAULT_ALPHAS)
            rdp = sum([one_step_rdp(rate, noise, alphas) * steps for noise, rate, steps in self.history])
            epsilon, best_alpha = analysis.get_privacy_spent(orders=list(alphas), rdp=rdp, delta=delta)
            return float(epsilon), float(best_alpha)

    return CachedRDPAccountant


@functools.lru_cache(maxsize=1024)
def one_step_rdp(sample_rate: float, noise_multiplier: float, orders: tuple) -> np.ndarray:
    """Opacus' RDP of one Poisson-subsampled Gaussian step at each of `orders` (read-only)."""
    from opacus.accountants.analysis import rdp as analysis

    rdp = analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(orders))
    rdp.setflags(write=False)
    return rdp


class PrivacyBudget:
    """Tracks epsilon of Poisson-subsampled Gaussian steps and enforces the cap.

    `metadata_epsilon` and `metadata_delta` are privacy already spent on the data outside
    training (DP estimates of the schema). By basic composition the run is (metadata_epsilon
    + training epsilon at `delta`, metadata_delta + `delta`)-DP: the epsilon part is in every
    reported total and counts against the cap. `prior` holds what was spent before this model's
    steps: the Gaussian rounds of the table's statistics (`marginals.noise_history`: steps of
    sampling rate 1) and, for a text model, the table model's and earlier text models' DP-SGD
    steps, which the accountant composes with these steps: "training epsilon" is that of all.
    """

    def __init__(self, accountant: str, noise_multiplier: float, sample_rate: float, delta: float,
                 max_epsilon: float | None = None, metadata_epsilon: float = 0.0, metadata_delta: float = 0.0,
                 prior: list | None = None):
        self.accountant_name = accountant
        self.accountant = make_accountant(accountant)
        self.prior = [tuple(h) for h in prior or []]
        self.accountant.history = list(self.prior)
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.delta = delta
        self.max_epsilon = max_epsilon
        self.metadata_epsilon = metadata_epsilon
        self.metadata_delta = metadata_delta
        # Training epsilon now and after one more step, computed at most once per step (PRV is slow).
        self._training_epsilon: float | None = None if self.prior else 0.0
        self._next_training_epsilon: float | None = None

    @property
    def steps(self) -> int:
        """DP-SGD steps accounted so far (the accountant's history holds (noise, rate, steps)
        entries, the statistics' rounds first)."""
        return sum(h[2] for h in self.accountant.history) - sum(h[2] for h in self.prior)

    @staticmethod
    def _epsilon_of(accountant, delta: float, fine: bool = False) -> float:
        """The accountant's epsilon at `delta`: an upper bound. PRV's is within its `eps_error` of
        the exact figure: 0.01 for the check before every step (fast, conservative), 0.001 with
        `fine` for the epsilon a run reports (about a second)."""
        if not accountant.history:
            return 0.0
        errors = {"eps_error": PRV_RECORD_EPS_ERROR if fine else PRV_STEP_EPS_ERROR} \
            if not isinstance(accountant, _cached_rdp_class()) else {}
        with np.errstate(divide="ignore", invalid="ignore"):  # PRV's log(1 - q) at q = 1 (the statistics' rounds)
            return float(accountant.get_epsilon(delta=delta, **errors))

    def training_epsilon(self) -> float:
        if self._training_epsilon is None:
            self._training_epsilon = self._epsilon_of(self.accountant, self.delta)
        return self._training_epsilon

    def epsilon(self) -> float:
        """Total epsilon spent so far: metadata + training."""
        return self.metadata_epsilon + self.training_epsilon()

    def epsilon_after_next_step(self) -> float:
        if self._next_training_epsilon is None:
            trial = copy.deepcopy(self.accountant)
            trial.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
            self._next_training_epsilon = self._epsilon_of(trial, self.delta)
        return self.metadata_epsilon + self._next_training_epsilon

    def allows_next_step(self) -> bool:
        return self.max_epsilon is None or self.epsilon_after_next_step() <= self.max_epsilon

    def step(self) -> None:
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        self._training_epsilon, self._next_training_epsilon = self._next_training_epsilon, None

    def restore(self, history: list) -> None:
        """Continue from a checkpoint's accountant history (never from zero); its entries are
        (noise_multiplier, sample_rate, steps)."""
        self.accountant.history = [tuple(h) for h in history]
        self._training_epsilon = self._next_training_epsilon = None

    def record(self) -> dict:
        """The accounting a run reports, its training epsilon the finer of the accountant's two
        upper bounds (`_epsilon_of`)."""
        training = min(self.training_epsilon(), self._epsilon_of(self.accountant, self.delta, fine=True))
        return {
            "epsilon": self.metadata_epsilon + training,
            "training_epsilon": training,
            "metadata_epsilon": self.metadata_epsilon,
            "delta": self.delta + self.metadata_delta,
            "training_delta": self.delta,
            "metadata_delta": self.metadata_delta,
            "max_epsilon": self.max_epsilon,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "accountant": self.accountant_name,
            "statistics_rounds": [{"noise_multiplier": h[0], "sample_rate": h[1]} for h in self.prior],
            "history": [list(h) for h in self.accountant.history],  # (noise, sample rate, steps), composed
        }


def epsilon_of_history(history: list, delta: float, accountant: str = "rdp") -> float:
    """Epsilon at `delta` of an accountant history of (noise multiplier, sampling rate, steps)."""
    if not history:
        return 0.0
    a = make_accountant(accountant)
    a.history = [tuple(h) for h in history]
    return PrivacyBudget._epsilon_of(a, delta)


def steps_within_cap(prior: list, noise: float, sample_rate: float, steps: int, delta: float, accountant: str,
                     cap: float | None, metadata_epsilon: float = 0.0) -> int:
    """How many of `steps` DP-SGD steps at `noise` and `sample_rate` a run takes after the `prior`
    history: all, or the most whose epsilon (with `metadata_epsilon`) stays within `cap` (the
    run stops before the step that would pass it)."""
    def within(k: int) -> bool:
        return metadata_epsilon + epsilon_of_history(prior + ([(noise, sample_rate, k)] if k else []), delta,
                                                     accountant) <= cap

    if cap is None or within(steps):
        return steps
    lo, hi = 0, steps
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if within(mid) else (lo, mid)
    return lo


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp",
                    prior: list | None = None) -> float:
    """The smallest noise multiplier (to 0.1 %) whose `steps` Poisson-sampled steps at `sample_rate`,
    after the `prior` history (the statistics' rounds), stay at or below `target_epsilon`."""
    prior = list(prior or [])
    if target_epsilon <= 0 or epsilon_of_history(prior, delta, accountant) >= target_epsilon:
        raise DplmError(f"the target epsilon {target_epsilon:.4g} leaves nothing for DP-SGD's steps after the schema's "
                        "and the statistics' share; raise privacy.max_epsilon or lower privacy.statistics_share")
    return smallest_noise(lambda sigma: epsilon_of_history(prior + [(sigma, sample_rate, steps)], delta, accountant),
                          target_epsilon, f"in {steps} steps")


def smallest_noise(epsilon_of_noise, target_epsilon: float, what: str = "") -> float:
    """The smallest noise multiplier (to 0.1 %) for which `epsilon_of_noise` (decreasing in the
    noise) stays at or below `target_epsilon`: bisection on the accountant's own figure."""
    lo, hi = 0.1, 1.0
    while epsilon_of_noise(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise DplmError(f"no noise multiplier reaches epsilon {target_epsilon:.4g} {what}".rstrip())
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if epsilon_of_noise(mid) > target_epsilon else (lo, mid)
    return hi


def noise_for_epsilon(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                      accountant: str = "rdp") -> float:
    """The smallest noise multiplier whose epsilon after `steps` Poisson-sampled steps stays at
    or below `target_epsilon` (`calibrate_noise` with no prior rounds)."""
    return calibrate_noise(target_epsilon, delta, sample_rate, steps, accountant)


def statistics_noise_for(rho: float, rounds: int) -> float:
    """The Gaussian noise multiplier of each of `rounds` statistics rounds that together spend
    zCDP `rho` (a round of noise multiplier z costs 1 / (2 z^2))."""
    return math.sqrt(rounds / (2 * rho))


# ---- DP estimates of schema metadata --------------------------------------------------

def secret_rng(secure_mode: bool = False):
    """The generator of the DP metadata mechanisms and the canaries: a numpy generator seeded
    from the OS and never recorded, or with `secure_mode` a `SecureRandom` that draws every
    value from the OS CSPRNG."""
    return SecureRandom() if secure_mode else np.random.default_rng(secrets.randbits(128))


class SecureRandom:
    """The draws `schema.estimate_schema_dp` makes, from os.urandom (privacy.secure_mode)."""

    def integers(self, high: int) -> int:
        """A uniform integer in [0, high)."""
        return secrets.randbelow(int(high))

    def normal(self, loc: float, scale: float, size) -> np.ndarray:
        """N(loc, scale^2) draws (`secure_gaussian`)."""
        return loc + secure_gaussian(size, scale).numpy()

    def random(self, size: int) -> np.ndarray:
        return secure_uniform(size)

    def laplace(self, loc: float, scale: float, size: int) -> np.ndarray:
        """Laplace(loc, scale) by inversion of uniforms in (0, 1) from `secure_uniform`."""
        u = secure_uniform(size) - 0.5
        return loc - scale * np.sign(u) * np.log1p(-2.0 * np.abs(u))

    def geometric(self, p: float, size: int | None = None):
        """Trials to the first success of probability p (1, 2, ...), by inversion."""
        draws = np.ceil(np.log(secure_uniform(1 if size is None else size)) / np.log1p(-p)).astype(np.int64)
        return int(draws[0]) if size is None else draws


def dp_count(count: int, epsilon: float, rng) -> int:
    """A count of units (sensitivity 1 under adding or removing one) released epsilon-DP as an
    integer: plus discrete Laplace noise, P(k) proportional to exp(-epsilon |k|) (the difference
    of two geometric draws), and at least 1."""
    p = 1.0 - math.exp(-epsilon)
    return max(1, int(count) + int(rng.geometric(p)) - int(rng.geometric(p)))


def integer_release(noisy: np.ndarray) -> np.ndarray:
    """Noisy counts as the integers a release holds: rounded (post-processing). A count with
    continuous noise released at full precision lets its low bits tell which value the noise was
    added to (Mironov 2012); rounded to integers far coarser than the floats' spacing, nothing of
    them is left."""
    return np.rint(noisy).astype(np.int64)


def category_threshold(epsilon: float, delta: float) -> float:
    """Noisy-count threshold of `dp_categories`: a value held by one unit passes it with
    probability at most delta."""
    return 1.0 + math.log(1.0 / (2.0 * delta)) / epsilon


def dp_categories(unit_values: list, epsilon: float, delta: float, rng: np.random.Generator) -> list[str]:
    """The values held by many privacy units, released with (epsilon, delta)-DP.

    `unit_values` holds one value per unit (callers pick one random row per subject, so a
    unit changes each count by at most 1). Each observed value's count gets Laplace(1/eps)
    noise and is kept if it passes `category_threshold`: rare values (a few units) almost
    never appear, and a value only one unit holds appears with probability <= delta
    (noisy-count thresholding, Korolova et al. 2009; Gopi et al. 2020 with one value per unit).
    """
    values, counts = np.unique(np.asarray(unit_values, dtype=object).astype(str), return_counts=True)
    noisy = counts + rng.laplace(0.0, 1.0 / epsilon, size=len(counts))
    return sorted(values[noisy > category_threshold(epsilon, delta)].tolist())


def range_threshold(epsilon: float, num_bins: int, failure: float = 0.01) -> float:
    """Noisy-count threshold of `dp_range`: with probability >= 1 - failure/2 no empty bin passes."""
    return math.log(num_bins / failure) / epsilon


def dp_range(values: np.ndarray, edges: np.ndarray, epsilon: float, rng: np.random.Generator) -> tuple | None:
    """(lower, upper) bounds of `values` (one per unit), epsilon-DP: a histogram over public
    bins (`edges`, fixed before looking at the data) gets Laplace(1/eps) noise on every
    count (a unit is in one bin: sensitivity 1), and the bounds are the outer edges of the
    outermost bins whose noisy counts pass `range_threshold`. Extremes held by few units
    fall outside (and are clipped). None when no bin passes (too few units for epsilon)."""
    counts = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)[0]
    passing = np.flatnonzero(counts + rng.laplace(0.0, 1.0 / epsilon, size=len(counts))
                             > range_threshold(epsilon, len(counts)))
    if len(passing) == 0:
        return None
    return float(edges[passing[0]]), float(edges[passing[-1] + 1])


def dp_mean(values: np.ndarray, bound: float, epsilon: float, rng: np.random.Generator) -> float:
    """The mean of `values` (one per unit) clipped to [0, `bound`], epsilon-DP: their sum with
    Laplace(2 bound / eps) noise over their count with Laplace(2 / eps) noise (one unit moves the
    sum by at most `bound` and the count by 1; each half of epsilon), clipped to [1, `bound`]."""
    total = float(np.clip(values, 0.0, bound).sum()) + rng.laplace(0.0, 2.0 * bound / epsilon, size=1)[0]
    count = len(values) + rng.laplace(0.0, 2.0 / epsilon, size=1)[0]
    return float(np.clip(total / max(count, 1.0), 1.0, bound))


def number_grid() -> np.ndarray:
    """Public bin edges for numeric bounds: 0 and +-m * 10^e, m in (1, 1.2, 1.5, 2, 2.5, 3,
    4, ..., 9), e from -3 to 12 (385 sorted values)."""
    mantissas = np.array([1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9])
    positive = np.unique(np.round((mantissas[None, :] * 10.0 ** np.arange(-3, 13)[:, None]).ravel(), 6))
    return np.concatenate([-positive[::-1], [0.0], positive])


def poisson_sample(num_units: int, sample_rate: float, generator: torch.Generator | None) -> torch.Tensor:
    """Indices of the units in one Poisson-sampled batch: each unit independently with prob. q.
    `generator=None` draws from the OS CSPRNG (secure_mode)."""
    if generator is None:
        return torch.from_numpy(np.flatnonzero(secure_uniform(num_units) < sample_rate))
    return torch.nonzero(torch.rand(num_units, generator=generator) < sample_rate).flatten()


def unseeded_generator(device="cpu") -> torch.Generator:
    """A generator seeded from the operating system and never recorded.

    DP noise and Poisson sampling must be secret: drawn from `train.seed`, which the run
    directory stores, anyone could recompute the noise and the batches. torch's generator is
    not a cryptographic one: `privacy.secure_mode` uses the OS CSPRNG instead."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def secure_uniform(n: int) -> np.ndarray:
    """n uniform floats in (0, 1) from the operating system's CSPRNG (os.urandom)."""
    bits = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)  # 53 random bits
    return (bits.astype(np.float64) + 0.5) / float(2**53)


def secure_gaussian(shape, std: float) -> torch.Tensor:
    """N(0, std^2) noise from os.urandom (Box-Muller in float64), as the sum of 4 draws / 2:
    Opacus' defence against floating-point attacks on Gaussian noise (arXiv 2107.10138)."""
    n = int(np.prod(shape))
    total = np.zeros(n)
    for _ in range(4):
        u1, u2 = secure_uniform(n), secure_uniform(n)
        total += np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return torch.from_numpy(total * std / 2.0).reshape(shape)


def _secure_optimizer_class(base):
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    class SecureDPOptimizer(base):
        """A DP optimizer whose Gaussian noise comes from the OS CSPRNG (secure_mode); with
        several processes only rank 0 adds noise, as in DistributedDPOptimizer."""

        def add_noise(self):
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                noise = 0.0
                if getattr(self, "rank", 0) == 0:
                    noise = secure_gaussian(p.summed_grad.shape, self.noise_multiplier * self.max_grad_norm)
                    noise = noise.to(p.summed_grad)
                p.grad = (p.summed_grad + noise).view_as(p)
                _mark_as_processed(p.summed_grad)

    return SecureDPOptimizer


def make_private(model, optimizer, noise_multiplier: float, max_grad_norm: float, expected_batch_size: int,
                 secure_mode: bool = False):
    """Wrap model and optimizer for DP-SGD: per-sample gradients (hooks), clipping and noise.

    The loss given to backward must be the mean over the micro-batch of per-row losses; the
    optimizer clips each row's gradient to `max_grad_norm`, sums, adds N(0, (noise*clip)^2)
    once per logical batch and divides by `expected_batch_size`. With `secure_mode` the noise
    comes from the OS CSPRNG (see `secure_gaussian`). With several processes each clips its
    share of the batch, the sums are all-reduced and only rank 0 adds noise.
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DistributedDPOptimizer, DPOptimizer

    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    base = DistributedDPOptimizer if world > 1 else DPOptimizer
    optimizer_class = _secure_optimizer_class(base) if secure_mode else base
    # Frozen embeddings mean no input needs a gradient; Opacus' hooks still fire correctly.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    dp_model = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    dp_optimizer = optimizer_class(
        optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        # Opacus' convention: each of `world` processes expects its share; the all-reduce
        # averages over processes, so the update is (sum of clipped grads + noise) / batch.
        expected_batch_size=expected_batch_size / world, loss_reduction="mean",
        generator=unseeded_generator(next(model.parameters()).device),
    )
    return dp_model, dp_optimizer


def sum_grad_samples_by_group(params, group_sizes: list[int]) -> None:
    """Replace per-row gradients by per-group sums (groups are consecutive rows), so that
    Opacus clips each group, i.e. each subject, as one sample."""
    index = torch.repeat_interleave(torch.arange(len(group_sizes)), torch.tensor(group_sizes))
    for p in params:
        rows = p.grad_sample
        index = index.to(rows.device)
        p.grad_sample = torch.zeros((len(group_sizes), *rows.shape[1:]), dtype=rows.dtype,
                                    device=rows.device).index_add_(0, index, rows)


def prepare_empty_step(params) -> None:
    """Give each parameter an empty per-sample gradient, so a Poisson batch that drew no
    rows still takes its noise-only step (skipping it would break the accounting)."""
    for p in params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)


def trainable_snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def restore_trainable(model, snapshot: dict[str, torch.Tensor]) -> None:
    """Copy a `trainable_snapshot` back into the model's trainable parameters."""
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.copy_(snapshot[name])


def assert_weights_changed(model, before: dict[str, torch.Tensor]) -> None:
    """Fail loudly if training left every adapter weight as it was (a known Opacus/peft pitfall:
    parameters created after Opacus hooks are registered never receive gradients)."""
    after = dict(model.named_parameters())
    changed = [n for n, w in before.items() if not torch.equal(w, after[n].detach())]
    if not changed:
        raise RuntimeError(
            "training finished but no LoRA weight changed: the optimizer never updated the adapter "
            "(check that LoRA was added before wrapping the model for DP)"
        )
