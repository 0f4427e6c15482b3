"""Two-level surface quasi-geostrophic (SQG) turbulence on batched torch tensors.

The Eady configuration of Tulloch & Smith (2009, doi:10.1175/2008JAS2921.1, section 3), as in
J. Whitaker's numpy model sqgturb: zero interior PV between rigid lids at z = 0 and z = H on a
doubly periodic f-plane square of side L. The state is the potential-temperature anomaly
theta (K) on both lids, ``[..., 2, N, N]`` (level 0 at z = 0, level 1 at z = H; y rows, x
columns). With s = f theta0 / g, theta / s = d(psi)/dz on the lids, and each lid obeys

    d(theta)/dt = -J(psi, theta) + (theta_eq - theta) / tdiab  [+/- s r |K|^2 psi, Ekman]

where psi is the streamfunction of the interior flow (spectral inversion), J(a, b) =
a_x b_y - a_y b_x is computed pseudo-spectrally with 3/2-rule dealiasing, theta_eq is the
baroclinic jet and an 8th-order hyperdiffusion is applied as an integrating factor after each
classical RK4 step. Spectra use ``norm="forward"`` (coefficients are Fourier amplitudes, the same
on any grid), so zero-padding to the 3N/2 grid needs no rescaling.

``sqgturb_compat=True`` reproduces sqgturb's Jacobian, which is (3/2)^2 = 2.25 times the true
one (and treats the N/2 Nyquist modes differently); see docs/sqg.md for the derivation.

``invert``, ``jacobian`` and ``tendency`` are the readable form of the equations; ``SQG.step``
runs the same arithmetic in buffers allocated once, with two real fields per complex FFT (the
note above ``_StepOperators``). On the CPU it shares groups of members out over
``torch.get_num_threads()`` worker threads (set it, or OMP_NUM_THREADS, to choose) whose ops run
single-threaded: intra-op threads over these small FFTs cost more than they bring.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from megavit.config import bounded
from megavit.data.sqg_netcdf import DAY

SQGTURB_JACOBIAN_FACTOR = 2.25  # (3/2)^2: sqgturb's padded-grid FFT normalization, docs/sqg.md
INIT_NOISE_PV = 100.0  # m/s: std of sqgturb's white-noise initial state (x s = 0.31 K)

# sqgturb's standard settings per resolution (its run script): N -> (dt [s], diff_efold [s])
PRESETS: dict[int, tuple[float, float]] = {64: (1200.0, 86400.0), 128: (600.0, 43200.0), 256: (240.0, 10800.0)}


@dataclass(frozen=True)
class SpectralOperators:
    """Arrays of one model at one (dtype, device), built once and reused by every step.

    Spectral arrays are ``[N, N//2+1]`` (rows l, columns k, as ``torch.fft.rfft2``); the
    ``*_pad`` ones live on the 3N/2 grid, ``[M, M//2+1]``.
    """

    n: int
    m: int  # padded grid size 3N/2
    ksq: torch.Tensor  # |K|^2 = k^2 + l^2 (rad/m)^2
    ikx_pad: torch.Tensor
    iky_pad: torch.Tensor
    psi_self: torch.Tensor  # psi_i = psi_self * theta_i - psi_cross * theta_j, see invert()
    psi_cross: torch.Tensor
    hyperdiff: torch.Tensor  # exp(-dt/diff_efold (|K|/K_max)^diff_order)
    theta_eq_hat: torch.Tensor  # [2, N, N//2+1] spectrum of the jet
    relax_rate: float  # 1 / tdiab (0 for no relaxation)
    ekman: torch.Tensor | None  # [2, N, N//2+1]: s r |K|^2 times (+1, -1) (symmetric) or (+1, 0)
    jacobian_factor: float  # 1, or 2.25 in sqgturb_compat mode
    keep_nyquist: bool  # sqgturb_compat: sqgturb's handling of the N/2 modes


@dataclass(frozen=True)
class SQG:
    """Two-level SQG turbulence as a forecast operator: ``step`` advances ``[..., 2, N, N]`` in K.

    Defaults are sqgturb's, with its 64^2 time step and diffusion (``SQG.preset`` for 128, 256).
    """

    N: int = 64  # grid points in x and y (even)
    L: float = 20.0e6  # domain side (m): 20 Rossby radii
    H: float = 10.0e3  # lid height (m)
    U: float = 30.0  # jet speed (m/s): the equilibrium lid winds are +/- U/2 sin(2 pi y / L)
    f: float = 1.0e-4  # Coriolis parameter (1/s)
    nsq: float = 1.0e-4  # Brunt-Vaisala frequency squared (1/s^2)
    g: float = 9.8  # gravity (m/s^2), with theta0 only converts to K: s = f theta0 / g
    theta0: float = 300.0  # reference potential temperature (K)
    dt: float = 1200.0  # RK4 time step (s)
    diff_order: int = 8  # hyperdiffusion order (del^diff_order)
    diff_efold: float = bounded(86400.0, gt=0, infinite=True)  # e-folding time (s) of wave N/2; inf: none
    tdiab: float = bounded(10.0 * DAY, gt=0, infinite=True)  # relaxation (s) back to the jet; inf: none
    r: float = 0.0  # Ekman damping coefficient (m/s), e.g. dek nsq / f; 0: none
    symmetric: bool = True  # symmetric jet (Ekman at both lids); False: no wind at z=0
    sqgturb_compat: bool = False  # True: sqgturb's 2.25x Jacobian, to reproduce its runs

    def __post_init__(self) -> None:
        if self.N < 8 or self.N % 2:
            raise ValueError(f"model.N must be an even number >= 8, got {self.N}")
        positive = {"L": self.L, "H": self.H, "f": self.f, "nsq": self.nsq, "g": self.g, "theta0": self.theta0,
                    "dt": self.dt, "diff_order": self.diff_order, "diff_efold": self.diff_efold, "tdiab": self.tdiab}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"model.{name} must be > 0, got {value}")
        if not self.r >= 0:
            raise ValueError(f"model.r must be >= 0, got {self.r}")

    @classmethod
    def preset(cls, n: int, **overrides: object) -> SQG:
        """sqgturb's standard setup at resolution ``n`` (64, 128 or 256): its dt and diff_efold."""
        if n not in PRESETS:
            raise ValueError(f"no SQG preset for N={n}; presets: {sorted(PRESETS)}")
        dt, diff_efold = PRESETS[n]
        return cls(**{"N": n, "dt": dt, "diff_efold": diff_efold, **overrides})

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (2, self.N, self.N)

    @property
    def scale(self) -> float:
        """s = f theta0 / g (K s/m): theta = s * sqgturb's pv (m/s)."""
        return self.f * self.theta0 / self.g

    def operators(self, dtype: torch.dtype, device: str | torch.device) -> SpectralOperators:
        """The precomputed spectral arrays for ``dtype`` (float32/64) on ``device`` (cached)."""
        return _operators(self, dtype, torch.device(device))

    def jet(self, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> torch.Tensor:
        """The equilibrium jet theta_eq (K), ``[2, N, N]``: a steady state of the full model."""
        return torch.fft.irfft2(self.operators(dtype, device).theta_eq_hat, s=(self.N, self.N), norm="forward")

    def step(self, x: torch.Tensor, steps: int = 1) -> torch.Tensor:
        """Advance ``x`` (``[..., 2, N, N]``, K) by ``steps`` RK4 steps, in x's dtype and device.

        Members are integrated in groups (``_Stepper``); on the CPU the groups are shared out over
        ``torch.get_num_threads()`` worker threads, each running its ops single-threaded, so the
        numbers do not depend on the thread count.
        """
        self.check_state(x)
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        workers = torch.get_num_threads() if x.device.type == "cpu" else 1
        with _single_threaded_ops if x.device.type == "cpu" else contextlib.nullcontext():
            theta_hat = torch.fft.rfft2(x.reshape(-1, *self.state_shape), norm="forward")
            if steps:
                theta_hat = _integrate(self, theta_hat, steps, workers)
            return torch.fft.irfft2(theta_hat, s=(self.N, self.N), norm="forward").reshape(x.shape)

    def check_state(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming the expected and found shape or dtype of a state."""
        if x.dim() < 3 or tuple(x.shape[-3:]) != self.state_shape:
            raise ValueError(f"SQG state must have shape [..., 2, {self.N}, {self.N}] (levels, y, x), "
                             f"found {list(x.shape)}")
        if x.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"SQG state must be float32 or float64, found {x.dtype}")

    def initial_state(self, generator: torch.Generator, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> torch.Tensor:
        """sqgturb's start: small white noise (zero mean per level), ``[2, N, N]`` in K.

        The relaxation builds the jet while its eddies grow (about 15 days to turbulence). Starting
        from the full jet instead makes the first eddies overshoot: with sqgturb's Jacobian and
        time step that broke the RK4 stability limit in 2 of 8 seeds (docs/sqg.md).
        """
        noise = torch.randn(self.state_shape, generator=generator, dtype=torch.float64, device=generator.device)
        noise = noise - noise.mean(dim=(-2, -1), keepdim=True)
        return (INIT_NOISE_PV * self.scale * noise).to(dtype=dtype, device=device)


def invert(theta_hat: torch.Tensor, ops: SpectralOperators) -> torch.Tensor:
    """Streamfunction spectra (m^2/s) from lid theta spectra (K), both ``[..., 2, N, N//2+1]``.

    psi(z) = A cosh(mu z/H) + B sinh(mu z/H), mu = |K| N H / f, with d(psi)/dz = theta / s on
    both lids gives psi_0 = (H/mu)(q_1/sinh mu - q_0/tanh mu), psi_1 = (H/mu)(q_1/tanh mu - q_0/sinh mu)
    for q = theta / s. The mean (K = 0) streamfunction is set to zero.
    """
    theta0, theta1 = theta_hat.unbind(-3)
    psi0 = ops.psi_cross * theta1 - ops.psi_self * theta0
    psi1 = ops.psi_self * theta1 - ops.psi_cross * theta0
    return torch.stack((psi0, psi1), dim=-3)


def jacobian(a_hat: torch.Tensor, b_hat: torch.Tensor, ops: SpectralOperators) -> torch.Tensor:
    """Dealiased spectrum of J(a, b) = a_x b_y - a_y b_x for spectra ``[..., N, N//2+1]``.

    Both fields are zero-padded to the 3N/2 grid, differentiated, multiplied there and the
    product truncated back (3/2 rule): exact (alias-free) for all modes |k|, |l| < N/2.
    """
    fields = _pad(torch.stack((a_hat, b_hat)), ops)  # [2, ..., M, M//2+1]
    grads = torch.fft.irfft2(torch.stack((ops.ikx_pad * fields, ops.iky_pad * fields)), s=(ops.m, ops.m),
                             norm="forward")  # [d/dx or d/dy, a or b, ..., M, M]
    product = grads[0, 0] * grads[1, 1] - grads[1, 0] * grads[0, 1]
    j_hat = _truncate(torch.fft.rfft2(product, norm="forward"), ops)
    return j_hat * ops.jacobian_factor if ops.jacobian_factor != 1.0 else j_hat


def tendency(theta_hat: torch.Tensor, ops: SpectralOperators) -> torch.Tensor:
    """d(theta_hat)/dt without hyperdiffusion: advection, relaxation to the jet, Ekman damping."""
    psi_hat = invert(theta_hat, ops)
    out = -jacobian(psi_hat, theta_hat, ops)
    if ops.relax_rate:
        out = out + ops.relax_rate * (ops.theta_eq_hat - theta_hat)
    if ops.ekman is not None:
        out = out + ops.ekman * psi_hat
    return out


def _pad(spec: torch.Tensor, ops: SpectralOperators) -> torch.Tensor:
    """Zero-pad ``[..., N, N//2+1]`` spectra to ``[..., M, M//2+1]``.

    Default: the modes |k|, |l| < N/2. Compat: as sqgturb, also the row l = -N/2 and, in the
    padded column k = N/2, the conjugate of the N-grid Nyquist column.
    """
    n, m, h = ops.n, ops.m, ops.n // 2
    low = h if ops.keep_nyquist else h - 1  # negative l rows kept: -low .. -1
    out = spec.new_zeros((*spec.shape[:-2], m, m // 2 + 1))
    out[..., :h, :h] = spec[..., :h, :h]
    out[..., m - low:, :h] = spec[..., n - low:, :h]
    if ops.keep_nyquist:
        out[..., :h, h] = spec[..., :h, h].conj()
        out[..., m - low:, h] = spec[..., n - low:, h].conj()
    return out


def _truncate(spec: torch.Tensor, ops: SpectralOperators) -> torch.Tensor:
    """Keep the N-grid modes of a padded spectrum (``_pad``'s set, without the k = N/2 column)."""
    n, m, h = ops.n, ops.m, ops.n // 2
    low = h if ops.keep_nyquist else h - 1
    out = spec.new_zeros((*spec.shape[:-2], n, n // 2 + 1))
    out[..., :h, :h] = spec[..., :h, :h]
    out[..., n - low:, :h] = spec[..., m - low:, :h]
    return out


def _wavenumbers(n: int, length: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, l) in rad/m on the rfft2 layout of an n x n grid, float64 ``[n, n//2+1]``."""
    k = torch.fft.rfftfreq(n, d=1.0 / n, dtype=torch.float64) * (2.0 * math.pi / length)
    l = torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64) * (2.0 * math.pi / length)
    return torch.meshgrid(l, k, indexing="ij")[::-1]


def _jet(model: SQG) -> torch.Tensor:
    """theta_eq (K) on the grid, float64 ``[2, N, N]``: the lid winds are +/- U/2 sin(2 pi y/L).

    With l = 2 pi / L and mu = l N H / f, the interior solution of the jet mode gives lid
    theta = -s (mu U / (2 l H)) coth(mu/2) cos(l y) on both lids (symmetric); or, asymmetric,
    -s (mu U / (l H)) cos(l y) / sinh(mu) at z = 0 and cosh(mu) times that at z = H.
    """
    wave = 2.0 * math.pi / model.L
    mu = wave * math.sqrt(model.nsq) * model.H / model.f
    y = torch.arange(model.N, dtype=torch.float64) * (model.L / model.N)
    profile = -torch.cos(wave * y) * model.scale * mu * model.U / (wave * model.H)
    if model.symmetric:
        amplitudes = torch.full((2,), 0.5 / math.tanh(0.5 * mu), dtype=torch.float64)
    else:
        amplitudes = torch.tensor([1.0 / math.sinh(mu), 1.0 / math.tanh(mu)], dtype=torch.float64)
    return (amplitudes[:, None] * profile[None, :])[:, :, None].expand(2, model.N, model.N).contiguous()


@functools.lru_cache(maxsize=16)
def _operators(model: SQG, dtype: torch.dtype, device: torch.device) -> SpectralOperators:
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"SQG runs in float32 or float64, found {dtype}")
    cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
    n, m = model.N, 3 * model.N // 2
    k, l = _wavenumbers(n, model.L)
    k_pad, l_pad = _wavenumbers(m, model.L)
    ksq = k**2 + l**2
    mu = ksq.sqrt() * (math.sqrt(model.nsq) * model.H / model.f)
    mu_safe = mu.clamp(min=1e-300)  # K = 0 handled below; the large-mu end stays finite in float64
    psi_self = (model.H / model.scale) / (mu_safe * torch.tanh(mu_safe))
    psi_cross = (model.H / model.scale) / (mu_safe * torch.sinh(mu_safe))
    psi_self[0, 0] = 0.0
    psi_cross[0, 0] = 0.0
    kmax = math.pi * n / model.L
    hyperdiff = torch.exp(-(model.dt / model.diff_efold) * (ksq.sqrt() / kmax) ** model.diff_order)
    if model.r > 0:
        signs = torch.tensor([1.0, -1.0 if model.symmetric else 0.0], dtype=torch.float64)
        ekman = (model.scale * model.r) * signs[:, None, None] * ksq
    else:
        ekman = None

    def real(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype)

    def imag(t: torch.Tensor) -> torch.Tensor:
        return (1j * t).to(device=device, dtype=cdtype)

    return SpectralOperators(
        n=n, m=m, ksq=real(ksq), ikx_pad=imag(k_pad), iky_pad=imag(l_pad),
        psi_self=real(psi_self), psi_cross=real(psi_cross), hyperdiff=real(hyperdiff),
        theta_eq_hat=torch.fft.rfft2(_jet(model), norm="forward").to(device=device, dtype=cdtype),
        relax_rate=0.0 if math.isinf(model.tdiab) else 1.0 / model.tdiab,
        ekman=None if ekman is None else real(ekman),
        jacobian_factor=SQGTURB_JACOBIAN_FACTOR if model.sqgturb_compat else 1.0,
        keep_nyquist=model.sqgturb_compat,
    )


# The time stepper. ``tendency`` above is the readable form; ``step`` runs the same arithmetic in a
# layout that needs no copies between the grids: the state lives on the 3N/2 grid's spectral rows
# (each N-grid mode at the row of its wavenumber l, the rows |l| > N/2 zero), columns k <= N/2. Then
# padding is a multiply by operators that are zero outside the padded set, truncation a multiply
# by a mask, and the whole RK4 step writes into buffers allocated once per batch size.
# Two real fields go through one complex FFT: z = f_x + i f_y for f = psi, theta on each level, so
# a tendency takes 4 complex inverse FFTs instead of 8 real ones (CPU FFTs cost about the same per
# line either way), and J = f_x g_y - f_y g_x = Im(conj(z_f) z_g). z's spectrum spans k = -N/2 ..
# N/2: it is built from the state and its mirror (l, k) -> (-l, -k), conjugated, gathered into one
# array ``both`` whose column c holds k = c - N/2. Stored that way, at columns 0 .. N of the 3N/2
# grid instead of at k mod 3N/2, every z carries the factor exp(2 pi i (N/2) x / (3N/2)), which
# cancels in conj(z_f) z_g. The k = 0 column of ``both`` holds f(l) + conj(f(-l)) and its operator
# a half, as irfft2 reads that column (the real part of its inverse along l).
# sqgturb_compat stores the column k = N/2 conjugated: _pad wants its conjugate on the fine grid,
# and every other operation on that column (relaxation, Ekman, diffusion) is real, so commutes.

GROUP_BYTES = 1 << 20  # members per group: the group's fields [members, 4, M, M] complex fill about this


@dataclass(frozen=True)
class _StepOperators:
    """``SpectralOperators`` recombined on the stepper's layouts (complex: no type promotion)."""

    m: int
    mirror: torch.Tensor  # [M * (N+1)]: for ``both``, the flat [M, N//2+1] index of (l, k) or of (-l, -k)
    pairs: torch.Tensor  # [source level, psi level 0 | 1, theta level 0 | 1, M, N+1]: spectra of z from ``both``
    advection: torch.Tensor  # [M, N//2+1]: -jacobian_factor on the truncated set, else 0
    linear: torch.Tensor  # [source level, level, M, N//2+1]: relaxation and Ekman, d(theta)/dt per theta
    forcing: torch.Tensor | None  # [2, M, N//2+1]: theta_eq / tdiab (None without relaxation)
    hyperdiff: torch.Tensor  # [M, N//2+1]


def _rows(ops: SpectralOperators) -> torch.Tensor:
    """The stepper row of each N-grid spectral row: l >= 0 in place, l < 0 moved down by N/2."""
    rows = torch.arange(ops.n)
    return torch.where(rows < ops.n // 2, rows, rows + ops.m - ops.n)


def _to_stepper_layout(spec: torch.Tensor, ops: SpectralOperators) -> torch.Tensor:
    """``[..., N, N//2+1]`` N-grid spectra on the stepper's rows, ``[..., M, N//2+1]`` (zeros between)."""
    out = spec.new_zeros((*spec.shape[:-2], ops.m, spec.shape[-1]))
    out[..., _rows(ops).to(spec.device), :] = spec
    return out


@functools.lru_cache(maxsize=16)
def _step_operators(model: SQG, dtype: torch.dtype, device: torch.device) -> _StepOperators:
    ops = _operators(model, torch.float64, torch.device("cpu"))
    m, h = ops.m, ops.n // 2
    cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
    k, l = ops.ikx_pad[:, : h + 1], ops.iky_pad[:, : h + 1]  # already on the 3N/2 grid's rows
    low = h if ops.keep_nyquist else h - 1  # as _pad: the rows l = -low .. h-1
    rows = torch.zeros(m, 1, dtype=torch.bool)
    rows[:h] = rows[m - low:] = True
    columns = torch.arange(h + 1) < h
    padded = rows & (columns | ops.keep_nyquist)  # the modes _pad copies
    truncated = rows & columns  # the modes _truncate keeps
    self_, cross = (_to_stepper_layout(t, ops) for t in (ops.psi_self, ops.psi_cross))
    inversion = torch.stack((torch.stack((-self_, -cross)), torch.stack((cross, self_))))  # [source, level]
    identity = torch.eye(2, dtype=torch.float64)[:, :, None, None]
    fields = torch.stack((inversion, identity.expand_as(inversion)), dim=1).flatten(1, 2)  # [source, psi|theta x level]
    # z = f_x + i f_y: (ik - l) F at k > 0, and irfft2's Hermitian mirror conj((ik - l) F)(-l, -k) at k < 0
    mirror_rows = -torch.arange(m) % m
    plus, minus = (padded * (k + sign * 1j * l) * fields for sign in (1, -1))
    mirrored = minus[..., mirror_rows, :].conj()
    # k = 0: a mode and its mirror share one operator where both are padded; compat pads l = -N/2 alone
    zero = 0.5 * torch.where(plus[..., :1] != 0, plus[..., :1], mirrored[..., :1])
    pairs = torch.cat((mirrored[..., 1:].flip(-1), zero, plus[..., 1:]), dim=-1)
    column = torch.arange(2 * h + 1)
    mirror = torch.where(column > h, torch.arange(m)[:, None] * (h + 1) + column - h,
                         mirror_rows[:, None] * (h + 1) + h - column)
    linear = -ops.relax_rate * identity.expand(2, 2, m, h + 1)
    if ops.ekman is not None:
        linear = linear + _to_stepper_layout(ops.ekman, ops) * inversion
    theta_eq = _to_stepper_layout(ops.theta_eq_hat, ops)

    def complex_(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=cdtype)

    return _StepOperators(
        m=m, mirror=mirror.flatten().to(device), pairs=complex_(pairs),
        advection=complex_(-ops.jacobian_factor * truncated), linear=complex_(linear),
        forcing=complex_(ops.relax_rate * theta_eq) if ops.relax_rate else None,
        hyperdiff=complex_(_to_stepper_layout(ops.hyperdiff, ops)))


class _Stepper:
    """RK4 steps of up to ``members`` states in the stepper layout, in buffers allocated once.

    A step is 4 x (3 ops to ``both``, 2 to the spectra of z, 1 complex ifft2, 2 to the product,
    1 rfft2, 4 to the tendency, 2 RK4 updates), all with ``out=`` or in place.
    """

    def __init__(self, ops: _StepOperators, dt: float, members: int, dtype: torch.dtype, device: torch.device):
        self.ops, self.dt = ops, dt
        m, columns = ops.m, ops.hyperdiff.shape[-1]
        cdtype = ops.hyperdiff.dtype

        def spectra(*shape: int) -> torch.Tensor:
            return torch.zeros((members, *shape), dtype=cdtype, device=device)

        self.state, self.stage, self.total, self.rate = (spectra(2, m, columns) for _ in range(4))
        self.both = spectra(2, m, 2 * columns - 1)
        self.z_spectra = spectra(4, m, m)
        self.z = spectra(4, m, m)
        self.product = torch.empty((members, 2, m, m), dtype=dtype, device=device)
        self.product_hat = spectra(2, m, m // 2 + 1)

    def run(self, spec: torch.Tensor, steps: int) -> None:
        """Advance ``spec`` (``[n, 2, M, N//2+1]``, n <= capacity) by ``steps`` RK4 steps, in place."""
        n, dt = spec.shape[0], self.dt
        state, stage, total, rate = self.state[:n], self.stage[:n], self.total[:n], self.rate[:n]
        of_state, of_stage = _Tendency(self, state, rate), _Tendency(self, stage, rate)
        state.copy_(spec)
        for _ in range(steps):  # total = state + dt/6 k1 + dt/3 k2 + dt/3 k3 + dt/6 k4
            of_state()
            torch.add(state, rate, alpha=dt / 6, out=total)
            for shift, weight in ((dt / 2, dt / 3), (dt / 2, dt / 3), (dt, dt / 6)):
                torch.add(state, rate, alpha=shift, out=stage)
                of_stage()
                total.add_(rate, alpha=weight)
            torch.mul(total, self.ops.hyperdiff, out=state)
        spec.copy_(state)


class _Tendency:
    """``out`` = d(spec)/dt, the dealiased -J(psi, theta), relaxation and Ekman (as ``tendency``), for
    one input buffer of a ``_Stepper``: the views are made once, so a call runs only the ops."""

    def __init__(self, stepper: _Stepper, spec: torch.Tensor, out: torch.Tensor):
        ops, n, h = stepper.ops, spec.shape[0], spec.shape[-1] - 1
        self.out, self.advection, self.forcing = out, ops.advection, ops.forcing
        self.pairs, self.linear = ops.pairs.unbind(), ops.linear.unbind()
        both = stepper.both[:n]
        self.spec_flat, self.both_flat = spec.flatten(-2), both.flatten(-2)
        self.mirror = ops.mirror.expand(*both.shape[:2], -1)
        self.both_mirrored, self.both_k0, self.spec_k0 = both[..., : h + 1], both[..., h], spec[..., 0]
        self.both_levels, self.spec_levels = (both[:, None, 0], both[:, None, 1]), (spec[:, None, 0], spec[:, None, 1])
        self.z_spectra, self.z = stepper.z_spectra[:n], stepper.z[:n]
        self.z_block = self.z_spectra[..., : 2 * h + 1]  # k = -N/2 .. N/2; the columns past it stay zero
        parts = torch.view_as_real(self.z)
        self.psi_x, self.psi_y, self.theta_x, self.theta_y = (parts[:, :2, ..., 0], parts[:, :2, ..., 1],
                                                              parts[:, 2:, ..., 0], parts[:, 2:, ..., 1])
        self.product, self.product_hat = stepper.product[:n], stepper.product_hat[:n]
        self.truncated = self.product_hat[..., : h + 1]

    def __call__(self) -> None:
        out = self.out
        torch.gather(self.spec_flat, -1, self.mirror, out=self.both_flat)
        self.both_mirrored.conj_physical_()
        self.both_k0.add_(self.spec_k0)
        torch.mul(self.pairs[0], self.both_levels[0], out=self.z_block)
        self.z_block.addcmul_(self.pairs[1], self.both_levels[1])
        torch.fft.ifft2(self.z_spectra, norm="forward", out=self.z)
        torch.mul(self.psi_x, self.theta_y, out=self.product)  # Im(conj(z_psi) z_theta)
        self.product.addcmul_(self.psi_y, self.theta_x, value=-1)
        torch.fft.rfft2(self.product, norm="forward", out=self.product_hat)
        torch.mul(self.advection, self.truncated, out=out)
        out.addcmul_(self.linear[0], self.spec_levels[0])
        out.addcmul_(self.linear[1], self.spec_levels[1])
        if self.forcing is not None:
            out.add_(self.forcing)


@dataclass
class _Workers:
    """The buffers of the worker threads (one ``_Stepper`` each) and the lock of the step that uses them."""

    steppers: list[_Stepper]
    lock: threading.Lock


@functools.lru_cache(maxsize=4)
def _workers(model: SQG, dtype: torch.dtype, device: torch.device, members: int) -> _Workers:
    """The workers for groups of up to ``members`` (cached: no buffers allocated per call)."""
    return _Workers([], threading.Lock())


def _integrate(model: SQG, theta_hat: torch.Tensor, steps: int, workers: int) -> torch.Tensor:
    """``steps`` RK4 steps of N-grid spectra ``[members, 2, N, N//2+1]``, in groups of members.

    On the CPU a group's buffers fill about GROUP_BYTES, so a step stays in cache instead of
    streaming (and, for large batches, page-faulting) fresh temporaries, and the groups are shared
    out over up to ``workers`` threads (the caller makes torch's ops single-threaded): the members
    are independent, so this scales where intra-op threads over small FFTs only add synchronization.
    The grouping depends on the problem's size only; between groupings the numbers agree to
    rounding (vectorized loops round their tails differently). A GPU gets one group.
    """
    ops = model.operators(theta_hat.real.dtype, theta_hat.device)
    dtype, device, h = theta_hat.real.dtype, theta_hat.device, model.N // 2
    spec = _to_stepper_layout(theta_hat, ops)
    if ops.keep_nyquist:
        spec[..., h].conj_physical_()  # see the note above _StepOperators
    per_member = 8 * ops.m**2 * spec.real.element_size()
    groups = spec.split(max(1, GROUP_BYTES // per_member)) if device.type == "cpu" else (spec,)
    workers = min(workers, len(groups))
    cached = _workers(model, dtype, device, groups[0].shape[0])
    steppers = cached.steppers

    # inference mode is per thread: the workers take the caller's, so that the groups of an inference
    # tensor (da-cycle steps under torch.inference_mode) may be updated in place there
    inference = torch.is_inference_mode_enabled()

    def work(worker: int) -> None:
        with torch.inference_mode(inference):
            for group in groups[worker::workers]:
                steppers[worker].run(group, steps)

    with cached.lock:  # another thread's step with the same buffers waits
        # the cached buffers are plain tensors, whichever mode made them, so any later step may update them
        with torch.inference_mode(False):
            while len(steppers) < workers:
                steppers.append(_Stepper(_step_operators(model, dtype, device), model.dt, groups[0].shape[0], dtype,
                                         device))
        if workers == 1:
            work(0)
        else:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(work, range(workers)))
    if ops.keep_nyquist:
        spec[..., h].conj_physical_()
    return spec[..., _rows(ops).to(device), :]


class _SingleThreadedOps:
    """Context: torch's intra-op threads at 1 while any SQG step runs (its worker threads are the
    parallelism); the count found by the first step to enter is restored by the last to leave."""

    def __init__(self) -> None:
        self.lock, self.depth, self.threads = threading.Lock(), 0, 1

    def __enter__(self) -> None:
        with self.lock:
            if self.depth == 0:
                self.threads = torch.get_num_threads()
                torch.set_num_threads(1)
            self.depth += 1

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.depth -= 1
            if self.depth == 0:
                torch.set_num_threads(self.threads)


_single_threaded_ops = _SingleThreadedOps()
