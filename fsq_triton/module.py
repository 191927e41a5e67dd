"""``fsq_triton.FSQ``: the reference FSQ module's surface, name for name, on the fused kernels.

Shape letters: ``b`` batch, ``n`` tokens, ``c`` codebooks, ``d`` channels per codebook
(``codebook_dim = len(levels)``), ``e = c * d`` (``effective_codebook_dim``).

Data flows one way: the module checks its input and turns it into the *feature view*
``(b, e, n)`` (a strided view, no copy), the op (``fsq_triton.ops``) quantizes that view, and the
module puts the result back into the caller's shape. With projections, ``project_in``, the
quantizer and ``project_out`` run as one fused op on the Triton path when they are plain ``nn.Linear``
layers (no subclass, hook or parametrization, which the fused kernel would skip); otherwise, and on the
PyTorch path, the projections are called as modules around the quantizer.

The Triton ops (``fsq_triton.ops``: triton and torch's compile machinery) are imported on first use,
when a module is built or moved where they can run, not by ``import fsq_triton``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
from einops import rearrange
from torch import nn

from . import torch_impl
from ._mode import interpreting
from .levels import basis_of, bound_kind, level_tables, reference_bound, validate_levels

BACKENDS = ("auto", "triton", "torch")

# The implicit codebook is built at construction up to this many floats (16 MiB); past it, on first access.
EAGER_CODEBOOK_LIMIT = 2**22
# ... and never past this many (1 GiB in float32): a larger one raises MemoryError instead of exhausting memory.
IMPLICIT_CODEBOOK_LIMIT = 2**28
# track_usage keeps one int64 count per code and codebook: up to this many codes (8 MiB per codebook).
USAGE_CODEBOOK_LIMIT = 2**20


class BackendUnavailableError(RuntimeError, ValueError):
    """``backend="triton"`` was asked for where the Triton kernels cannot run."""


_OPS = None  # fsq_triton.ops once imported; False where triton cannot be imported


def _load_ops():
    """``fsq_triton.ops`` (imported on first use: it costs a second or more), or None without triton."""
    global _OPS
    if _OPS is None:
        try:
            from . import ops
        except ImportError:  # no triton on this platform: the PyTorch path serves everything
            _OPS = False
        else:
            _OPS = ops
    return _OPS or None


def _may_run_triton(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def _is_plain(module: nn.Module, cls: type) -> bool:
    """Whether calling ``module`` is exactly ``cls.forward`` on its own parameters: its class is ``cls`` itself
    (not a subclass such as a LoRA adapter, nor the class a parametrization generates), no ``forward`` set on the
    instance (as accelerate's ``add_hook_to_module`` does for offloading), and no hook (its own or a global one)
    would fire. Only then may a fused kernel, which reads the weights directly, stand in for it."""
    if type(module) is not cls or "forward" in module.__dict__:  # an instance's own forward (accelerate's hooks)
        return False
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
        return False
    hooks = nn.modules.module
    return not (
        hooks._global_forward_hooks or hooks._global_forward_pre_hooks
        or hooks._global_backward_hooks or hooks._global_backward_pre_hooks
    )


def _param_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype of a module's (first floating-point) parameters, which its input is cast to; ``default`` without."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), default)


def _autocast_off(device_type: str):
    """``torch.autocast(device_type, enabled=False)`` where autocast exists (not on ``meta``). (Dynamo before torch
    2.13 cannot trace ``is_autocast_available``; a device that compiles has autocast.)"""
    if device_type != "meta" and (torch.compiler.is_compiling() or torch.amp.is_autocast_available(device_type)):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _check_float_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, found {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, bfloat16, float16 or float64), found {t.dtype}")
    return t


class FSQ(nn.Module):
    """Finite Scalar Quantization (Mentzer et al., 2023), a drop-in for the reference ``FSQ``.

    Args:
        levels: number of levels of each channel of a codebook, e.g. ``[8, 5, 5, 5, 5]``.
        dim: feature size of the input; defaults to ``len(levels) * num_codebooks``. When it differs,
            ``project_in``/``project_out`` are ``nn.Linear`` layers to and from the codebook channels.
        num_codebooks: codebooks per token, each with its own index and the same ``levels``.
        keep_num_codebooks_dim: keep the codebook axis in ``indices``; defaults to ``num_codebooks > 1``.
        scale: stored, unused (as in the reference).
        allowed_dtypes, force_quantization_f32: vector-quantize-pytorch's precision options, accepted and stored.
            fsq_triton's quantization math is always float32 (vqp with ``force_quantization_f32=True`` and a
            float32 input computes the same); ``out`` comes back in the input's dtype.
        channel_first: a 3-d input is ``(b, dim, n)`` (read through its strides, no copy), and
            ``indices_to_codes`` returns channel-first codes too (vqp's ``channel_first``).
        projection_has_bias: whether ``project_in``/``project_out`` have a bias.
        return_indices: ``False``: ``forward`` returns ``(out, None)``, no ``implicit_codebook`` is built, and
            codebooks past int32 are allowed: the forward kernel neither reduces nor stores the indices.
        preserve_symmetry: the symmetric grid ``2 / (L - 1) * floor((L - 1) * (tanh(z) + 1) / 2 + 0.5) - 1``
            (vqp's ``symmetry_preserving_bound``). vqp refuses a level of 2 without it; fsq_triton accepts one, as
            the reference does (its codes are -1 and 0).
        noise_dropout: vqp's noise dropout probability (training only, needs ``preserve_symmetry``).
        bound_hard_clamp: ``clamp(., -1, 1)`` in place of ``tanh`` (gradient 0 outside the clamp).
        orthogonal_rotation: vqp's ``orthogonal_rot`` buffer ``R`` (d, d): ``z @ R`` before quantizing,
            ``codes @ R.T`` after (in torch, around the fused quantizer).
        backend: ``"auto"`` (Triton kernels on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1``;
            the PyTorch path otherwise), ``"triton"`` (the kernels, or :class:`BackendUnavailableError`)
            or ``"torch"`` (the PyTorch path).
        track_usage: count the codes every forward produces (on the device, no host sync):
            :meth:`codebook_usage` (counts, fraction used, perplexity; all-reduced over DDP ranks on request),
            :meth:`reset_usage`. Codebooks up to 2**20 codes (a larger one is a ``ValueError``); with or without
            ``return_indices``. On the Triton path the forward kernel adds the counts itself (int64 atomics into
            ``usage_counts``: no extra pass, no host sync, also under torch.compile and in CUDA graphs), with fused
            projections too; the PyTorch path adds them with one ``index_add_`` after the quantizer.

    Each bound (``preserve_symmetry`` x ``bound_hard_clamp``) is a calibration of the same level tables
    (:data:`fsq_triton.levels.BOUNDS`): the forward kernel is the same for all four and evaluates no ``tanh``.

    ``forward(z)`` takes a sequence ``(b, n, dim)`` or a channel-first image/video ``(b, dim, *spatial)``
    and returns ``(out, indices)``: ``out`` in z's shape and dtype, ``indices`` int32 of shape
    ``(b, n)``/``(b, *spatial)``, with a trailing codebook axis when ``keep_num_codebooks_dim``.

    Plain ``nn.Linear`` projections run fused with the quantizer on the Triton path; replace them, subclass
    them, hook or parametrize them, and they are called as modules instead. Gradients of every order,
    ``torch.func`` transforms and forward-mode AD match the PyTorch path (``fsq_triton.ops.autograd``).
    """

    def __init__(
        self,
        levels: Sequence[int],
        dim: int | None = None,
        num_codebooks: int = 1,
        keep_num_codebooks_dim: bool | None = None,
        scale: float | None = None,
        allowed_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64),
        channel_first: bool = False,
        projection_has_bias: bool = True,
        return_indices: bool = True,
        force_quantization_f32: bool = True,
        preserve_symmetry: bool = False,
        noise_dropout: float = 0.0,
        bound_hard_clamp: bool = False,
        orthogonal_rotation: bool = False,
        *,
        backend: str = "auto",
        track_usage: bool = False,
    ):
        super().__init__()
        for name, flag in (
            ("channel_first", channel_first), ("projection_has_bias", projection_has_bias),
            ("return_indices", return_indices), ("force_quantization_f32", force_quantization_f32),
            ("preserve_symmetry", preserve_symmetry), ("bound_hard_clamp", bound_hard_clamp),
            ("orthogonal_rotation", orthogonal_rotation), ("track_usage", track_usage),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, found {flag!r}")
        if isinstance(allowed_dtypes, torch.dtype) or not isinstance(allowed_dtypes, (tuple, list)) or not all(
            isinstance(t, torch.dtype) for t in allowed_dtypes
        ):
            raise TypeError(f"allowed_dtypes must be a tuple of torch dtypes, found {allowed_dtypes!r}")
        if isinstance(noise_dropout, bool) or not isinstance(noise_dropout, (int, float)) or not 0.0 <= noise_dropout <= 1.0:
            raise ValueError(f"noise_dropout must be a probability in [0, 1], found {noise_dropout!r}")
        levels = validate_levels(levels, check_codebook_size=return_indices)
        if noise_dropout > 0 and not preserve_symmetry:
            raise ValueError(f"noise_dropout={noise_dropout} needs preserve_symmetry=True (vqp's noise acts on the symmetric codes)")
        if isinstance(num_codebooks, bool) or not isinstance(num_codebooks, int):
            raise TypeError(f"num_codebooks must be an int, found {num_codebooks!r}")
        if num_codebooks < 1:
            raise ValueError(f"num_codebooks must be at least 1, found {num_codebooks}")
        if keep_num_codebooks_dim is None:
            keep_num_codebooks_dim = num_codebooks > 1
        if num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError(
                f"keep_num_codebooks_dim must be True with num_codebooks={num_codebooks} > 1: "
                "each token has one index per codebook"
            )
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise ValueError(f"dim must be a positive int or None, found {dim!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, found {backend!r}")

        self.levels = levels
        self.backend = backend
        self.allowed_dtypes = tuple(allowed_dtypes)
        self.force_quantization_f32 = force_quantization_f32
        self.channel_first = channel_first
        self.return_indices = return_indices
        self.preserve_symmetry = preserve_symmetry
        self.noise_dropout = float(noise_dropout)
        self.bound_hard_clamp = bound_hard_clamp
        self.orthogonal_rotation = orthogonal_rotation
        self.bound_kind = bound_kind(preserve_symmetry, bound_hard_clamp)  # the calibration of the level tables
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int32), persistent=False)
        self.register_buffer("_basis", basis_of(levels), persistent=False)
        self.scale = scale

        self.codebook_dim = len(levels)
        self.num_codebooks = num_codebooks
        self.effective_codebook_dim = self.codebook_dim * num_codebooks
        self.keep_num_codebooks_dim = bool(keep_num_codebooks_dim)
        self.dim = self.effective_codebook_dim if dim is None else dim

        self.has_projections = self.dim != self.effective_codebook_dim
        bias = projection_has_bias
        self.project_in = nn.Linear(self.dim, self.effective_codebook_dim, bias=bias) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(self.effective_codebook_dim, self.dim, bias=bias) if self.has_projections else nn.Identity()

        self.codebook_size = math.prod(levels)
        self._prepare(self._levels.device)
        if return_indices:  # vqp builds no implicit codebook without indices
            eager = self.codebook_size * self.codebook_dim <= EAGER_CODEBOOK_LIMIT
            self.register_buffer("implicit_codebook", self._implicit_codebook() if eager else None, persistent=False)
            if not eager:  # an empty stand-in that follows .to()/.double()/.cuda(), so the lazy codebook does too
                self.register_buffer("_implicit_codebook_like", torch.empty(0), persistent=False)
        self.track_usage = track_usage
        if track_usage:
            if self.codebook_size > USAGE_CODEBOOK_LIMIT:
                raise ValueError(
                    f"track_usage=True keeps a count per code: codebook_size {self.codebook_size} of levels {list(levels)} "
                    f"is past the limit of 2**20 = {USAGE_CODEBOOK_LIMIT} codes"
                )
            # not persistent: a vqp state_dict (which has no such key) loads with strict=True, and back
            self.register_buffer("usage_counts", torch.zeros(num_codebooks, self.codebook_size, dtype=torch.int64), persistent=False)
        if orthogonal_rotation:  # a persistent buffer (a state_dict key), initialised as vqp does
            orthogonal_rot = torch.empty(self.codebook_dim, self.codebook_dim)
            nn.init.orthogonal_(orthogonal_rot)
            self.register_buffer("orthogonal_rot", orthogonal_rot)

    def _apply(self, fn, *args, **kwargs):
        """Moves and casts as nn.Module does, then calibrates the level tables for the new device, so that the
        first forward there (also one traced by torch.compile) finds them cached."""
        module = super()._apply(fn, *args, **kwargs)
        self._prepare(self._levels.device)
        return module

    def _prepare(self, device: torch.device) -> None:
        """Calibrate the level tables on ``device`` and import the Triton ops where they can run there, so that
        the first forward (also one traced by torch.compile) finds both ready."""
        if device.type in ("cpu", "cuda"):
            level_tables(self.levels, device, self.bound_kind)
        if self.backend != "torch" and _may_run_triton(device):
            _load_ops()

    def extra_repr(self) -> str:
        return (
            f"levels={list(self.levels)}, dim={self.dim}, num_codebooks={self.num_codebooks}, "
            f"codebook_size={self.codebook_size}, bound={self.bound_kind!r}, backend={self.backend!r}"
        )

    # ----------------------------------------------------------------------------------------------
    # The implicit codebook (built lazily when it is huge: the reference tries to allocate it and dies)
    # ----------------------------------------------------------------------------------------------

    def _implicit_codebook(self) -> torch.Tensor:
        """``indices_to_codes(arange(codebook_size), project_out=False)`` as the reference computes it.

        With ``keep_num_codebooks_dim`` the reference folds the index axis into the codebook axis, giving a
        flat ``(codebook_size * d,)`` tensor; that quirk is kept so that the buffer matches the reference.
        Built a channel at a time in int32 (the codebook fits int32), so the peak is the result plus a few
        ``codebook_size`` columns. Past ``IMPLICIT_CODEBOOK_LIMIT`` values it raises ``MemoryError``.
        """
        values = self.codebook_size * self.codebook_dim
        if values > IMPLICIT_CODEBOOK_LIMIT:
            raise MemoryError(
                f"implicit_codebook of levels {list(self.levels)} would hold {self.codebook_size} x {self.codebook_dim} = "
                f"{values} values ({values * 4 / 2**30:.1f} GiB in float32), more than fsq_triton builds "
                f"(IMPLICIT_CODEBOOK_LIMIT = 2**{IMPLICIT_CODEBOOK_LIMIT.bit_length() - 1} values); decode the indices you "
                "need with indices_to_codes(indices, project_out=False) instead"
            )
        device = self._levels.device
        indices = torch.arange(self.codebook_size, device=device, dtype=torch.int32)
        codes = torch.empty(self.codebook_size, self.codebook_dim, device=device)
        for j in range(self.codebook_dim):
            level = (indices // self._basis[j]) % self._levels[j]
            if self.preserve_symmetry:  # vqp's symmetric _scale_and_shift_inverse
                codes[:, j] = level * (2.0 / (self._levels[j] - 1)) - 1.0
            else:
                half_width = self._levels[j] // 2
                codes[:, j] = (level - half_width) / half_width
        return codes.flatten() if self.keep_num_codebooks_dim else codes

    def __getattr__(self, name: str):
        value = super().__getattr__(name)
        if name == "implicit_codebook" and value is None:
            like = self._buffers["_implicit_codebook_like"]
            value = self._implicit_codebook().to(device=like.device, dtype=like.dtype)
            self._buffers["implicit_codebook"] = value
        return value

    # ----------------------------------------------------------------------------------------------
    # Backend choice and the quantizer on the feature view
    # ----------------------------------------------------------------------------------------------

    def _triton_ops(self, t: torch.Tensor):
        """The ops module if this call runs the Triton kernels, else None (PyTorch path)."""
        if self.backend == "torch":
            return None
        ops = _load_ops() if _may_run_triton(t.device) else None
        if ops is not None:
            return ops
        if self.backend == "triton":
            if ops is None:
                raise BackendUnavailableError("backend='triton' needs the triton package, which cannot be imported here")
            raise BackendUnavailableError(
                f"backend='triton' runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), found a tensor on {t.device}"
            )
        return None

    def _quantize_feature(
        self, feature: torch.Tensor, channels_last: bool, num_codebooks: int | None = None, forward: bool = False,
        noise: bool = False, rotation: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(b, c*d, n) -> codes (b, c*d, n) in feature's dtype, indices (b, n, c) int32; differentiable.

        ``forward=True`` (the module's forward, not :meth:`quantize`): the options apply. Without
        ``return_indices`` the indices are None (the kernel neither reduces nor stores them), and with
        ``track_usage`` the codes are counted into ``usage_counts`` (by the kernel itself on the Triton path).
        ``noise=True`` (only where :meth:`_noise_in_kernel` said so): the kernel also applies the noise dropout.
        ``rotation`` (only from :meth:`_rotation_in_kernel`): the kernel quantizes ``z_c @ R`` and returns
        ``codes_c @ R.T``, vqp's orthogonal rotation.
        """
        c = self.num_codebooks if num_codebooks is None else num_codebooks
        tables = level_tables(self.levels, feature.device, self.bound_kind)
        ops = self._triton_ops(feature)
        write_indices = self.return_indices or not forward
        usage = self.usage_counts if forward and self.track_usage else None
        if ops is not None:
            if usage is not None and usage.device != feature.device:
                raise RuntimeError(
                    f"usage_counts is on {usage.device} and the input on {feature.device}: move the module with .to()"
                )
            if rotation is not None:
                codes, indices = ops.apply_quantize_rotated(
                    feature, rotation, tables.values, tables.integers, c, channels_last, write_indices, usage,
                    self.noise_dropout if noise else None)
            elif noise:
                codes, indices = ops.apply_quantize_noisy(
                    feature, tables.values, tables.integers, c, channels_last, write_indices, usage, self.noise_dropout)
            else:
                codes, indices = ops.apply_quantize(feature, tables.values, tables.integers, c, channels_last, write_indices, usage)
            return codes, indices if write_indices else None
        codes, indices = torch_impl.quantize(feature, tables, c)
        if usage is not None:
            self._count_usage(indices)
        return codes, indices if write_indices else None

    def _fuses_projections(self) -> bool:
        """Whether the fused kernels may stand in for ``project_in``/``project_out``: both plain ``nn.Linear``."""
        e, dim = self.effective_codebook_dim, self.dim
        return (
            self.has_projections and _is_plain(self.project_in, nn.Linear) and _is_plain(self.project_out, nn.Linear)
            and self.project_in.weight.shape == (e, dim) and self.project_out.weight.shape == (dim, e)
        )

    def _calls_projections(self) -> bool:
        """Whether forward must call ``project_in``/``project_out`` (the reference always calls them): they are
        projections, or the ``nn.Identity`` stand-ins were replaced or hooked."""
        return self.has_projections or not (
            _is_plain(self.project_in, nn.Identity) and _is_plain(self.project_out, nn.Identity)
        )

    # ----------------------------------------------------------------------------------------------
    # The reference's methods
    # ----------------------------------------------------------------------------------------------

    def bound(self, z: torch.Tensor, eps: float = 1e-3, hard_clamp: bool = False) -> torch.Tensor:
        """``tanh(z + shift) * half_l - offset`` on the last dim (``codebook_dim``), as the reference; with
        ``hard_clamp``, ``clamp(z + offset / half_l, -1, 1) * half_l - offset`` (vqp's hard clamp). The bounded
        value, before rounding (vqp 1.32's ``bound`` rounds and divides too: that is :meth:`quantize`)."""
        _check_float_tensor("z", z)
        if not hard_clamp:
            return reference_bound(z, self._levels.to(z.device), eps)
        levels = self._levels.to(z.device)
        half_l = (levels - 1) * (1 + eps) / 2
        offset = torch.where(levels % 2 == 0, 0.5, 0.0)
        return torch.clamp(z + offset / half_l, min=-1.0, max=1.0) * half_l - offset

    def symmetry_preserving_bound(self, z: torch.Tensor, hard_clamp: bool = False) -> torch.Tensor:
        """vqp's ``2 / (L - 1) * floor((L - 1) * (tanh(z) + 1) / 2 + 0.5) - 1`` on the last dim (``clamp(z, -1, 1)``
        in place of ``tanh`` with ``hard_clamp``), straight-through (``floor_ste``), in vqp's float32 ops."""
        _check_float_tensor("z", z)
        levels_minus_1 = self._levels.to(z.device) - 1
        bounded = torch.clamp(z, min=-1.0, max=1.0) if hard_clamp else z.tanh()
        return (2.0 / levels_minus_1) * torch_impl.floor_ste((levels_minus_1 * (bounded + 1) / 2.0) + 0.5) - 1.0

    def indices_to_level_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``(indices[..., None] // basis) % levels``: each channel's level index (..., ``codebook_dim``), as vqp."""
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices must be a torch.Tensor, found {type(indices).__name__}")
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"indices must be an integer tensor, found {indices.dtype}")
        return (indices[..., None] // self._basis.to(indices.device)) % self._levels.to(indices.device)

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Quantize ``z (..., codebook_dim)`` to codes of the same shape and dtype, straight-through."""
        _check_float_tensor("z", z)
        if z.ndim == 0 or z.shape[-1] != self.codebook_dim:
            raise ValueError(f"quantize expects z of shape (..., {self.codebook_dim}), found {tuple(z.shape)}")
        tokens = z.reshape(1, -1, self.codebook_dim)                  # (1, n, d)
        codes, _ = self._quantize_feature(tokens.transpose(1, 2), channels_last=True, num_codebooks=1)
        return codes.transpose(1, 2).reshape(z.shape)

    def codes_to_indices(self, zhat: torch.Tensor) -> torch.Tensor:
        """Index of each code ``zhat (..., codebook_dim)``: exact int32, ``-1`` where a code is NaN or off the grid.

        The level is ``round(code * half_width + half_width)`` per channel (the reference truncates the float
        sum instead, which is exact only for codebooks under 2**24 and levels up to 25); with ``preserve_symmetry``
        ``round((code + 1) / (2 / (L - 1)))``, vqp's symmetric ``_scale_and_shift``. Codes are those before the
        orthogonal rotation, as in vqp.
        """
        _check_float_tensor("zhat", zhat)
        if zhat.ndim == 0 or zhat.shape[-1] != self.codebook_dim:
            raise ValueError(f"codes_to_indices expects zhat of shape (..., {self.codebook_dim}), found {tuple(zhat.shape)}")
        levels, basis = self._levels.to(zhat.device), self._basis.to(zhat.device)
        if self.preserve_symmetry:
            level = ((zhat.float() + 1.0) / (2.0 / (levels - 1))).round()
        else:
            half_width = levels // 2
            level = (zhat.float() * half_width + half_width).round()
        invalid = (level.isnan() | (level < 0) | (level >= levels)).any(dim=-1)
        indices = (level.nan_to_num(0.0).to(torch.int64) * basis).sum(dim=-1)
        return torch.where(invalid, -1, indices).to(torch.int32)

    def indices_to_codes(self, indices: torch.Tensor, project_out: bool = True) -> torch.Tensor:
        """Codes of ``indices``, the inverse of ``forward``'s indices.

        ``indices`` is ``(b, n)``/``(b, *spatial)`` (with a trailing ``c`` axis when ``keep_num_codebooks_dim``);
        the codes are ``(b, n, dim)`` for sequences and channel-first ``(b, dim, *spatial)`` when
        ``indices.ndim >= 3 + keep_num_codebooks_dim`` or ``channel_first``, as vqp decides. ``project_out=False``
        skips the output projection (``e`` channels instead of ``dim``); the orthogonal rotation applies either way.

        An index outside ``[0, codebook_size)`` raises ``IndexError`` for CPU tensors; on CUDA, where the
        check would cost a device sync, it decodes to NaN codes.
        """
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices must be a torch.Tensor, found {type(indices).__name__}")
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"indices must be an integer tensor, found {indices.dtype}")
        c = self.num_codebooks
        keep = self.keep_num_codebooks_dim
        if keep and (indices.ndim == 0 or indices.shape[-1] != c):
            raise ValueError(
                f"indices must end in the codebook axis of size num_codebooks={c}, found shape {tuple(indices.shape)}"
            )
        if indices.device.type == "cpu" and indices.numel() > 0:
            self._check_index_range(indices)

        is_img_or_video = indices.ndim >= 3 + int(keep)
        tokens = indices if keep else indices.unsqueeze(-1)  # (..., c)
        lead = tokens.shape[:-1]
        b = lead[0] if is_img_or_video else 1
        n = math.prod(lead[1:]) if is_img_or_video else math.prod(lead)
        tokens = tokens.reshape(b, n, c)                      # (b, n, c)
        project = project_out and (self.has_projections or not _is_plain(self.project_out, nn.Identity))
        tables = level_tables(self.levels, indices.device, self.bound_kind)
        ops = self._triton_ops(tokens)

        fused_rotation = None  # orthogonal_rotation in the fused decode (plain eager calls)
        if ops is not None and project and self._fuses_projections() and self.orthogonal_rotation:
            fused_rotation = self._rotation_in_kernel(tokens)
        if ops is not None and project and self._fuses_projections() and (
                not self.orthogonal_rotation or fused_rotation is not None):
            w_out, b_out = self._projection_params(self.project_out)
            if fused_rotation is not None:  # code_c @ R.T, then project_out, in the one kernel
                feature = ops.decode_projected_rotated(
                    tokens, w_out, b_out, fused_rotation, tables.values, tables.integers, self.codebook_size,
                    not is_img_or_video,
                )
            else:
                feature = ops.apply_indices_to_codes_projected(
                    tokens, w_out, b_out, tables.values, tables.integers, self.codebook_size, not is_img_or_video
                )                                              # (b, dim, n)
        else:
            dtype = _param_dtype(self.project_out, torch.float32) if project else torch.float32
            rotation = self._rotation_in_kernel(tokens)
            # rotated in torch ops: the codes in float32 first (rounded to dtype once, after R.T, as the forward does)
            decode_dtype = torch.float32 if self.orthogonal_rotation and rotation is None else dtype
            if rotation is not None:  # codes @ R.T in the decode kernel
                feature = ops.decode_rotated(
                    tokens, rotation, tables.values, tables.integers, self.codebook_size, project or not is_img_or_video,
                    dtype,
                )
            elif ops is not None:
                feature = ops.apply_indices_to_codes(
                    tokens, tables.values, tables.integers, self.codebook_size, project or not is_img_or_video,
                    decode_dtype,
                )
            else:
                feature = torch_impl.indices_to_codes(
                    tokens, tables, self.codebook_size, decode_dtype, assume_valid=tokens.device.type == "cpu"  # checked above
                )
            if self.orthogonal_rotation and rotation is None:  # codes @ R.T, per codebook, in float32
                rotated = rearrange(feature.float(), "b (c d) n -> b n c d", c=c) @ self.orthogonal_rot.float().t()
                feature = rearrange(rotated, "b n c d -> b (c d) n").to(dtype)
            if project:  # the projection follows the weights' dtype, autocast or not (as in forward)
                with _autocast_off(indices.device.type):
                    feature = self.project_out(feature.transpose(1, 2)).transpose(1, 2)

        channels = feature.shape[1]
        if is_img_or_video:
            return feature.reshape(b, channels, *lead[1:])
        codes = feature.transpose(1, 2).reshape(*lead, channels)
        return codes.movedim(-1, 1) if self.channel_first and codes.ndim >= 2 else codes  # vqp: 'b ... d -> b d ...'

    def _check_index_range(self, indices: torch.Tensor) -> None:
        """IndexError for a (CPU) index outside ``[0, codebook_size)``; unsigned dtypes are read as their values."""
        while torch._C._functorch.is_functorch_wrapped_tensor(indices):  # under torch.func: check every sample
            indices = torch._C._functorch.get_unwrapped(indices)
        wide = indices.to(torch.int64) if indices.dtype in (torch.uint16, torch.uint32, torch.uint64) else indices
        low, high = int(wide.min()), int(wide.max())
        if low < 0 and indices.dtype == torch.uint64:  # past 2**63: wrapped negative by the cast
            raise IndexError(f"indices must lie in [0, {self.codebook_size}), found {low + 2**64}")
        if low < 0 or high >= self.codebook_size:
            bad = low if low < 0 else high
            raise IndexError(f"indices must lie in [0, {self.codebook_size}), found {bad}")

    def _projection_params(self, *linears: nn.Linear):
        """(weight, bias) of each linear (default: project_in, project_out), contiguous, in the weights' dtype
        (a missing bias is an empty tensor: the fused kernels then drop the term and read nothing)."""
        params = []
        for linear in linears or (self.project_in, self.project_out):
            weight = linear.weight.contiguous()
            bias = linear.bias if linear.bias is not None else weight.new_empty(0)
            params += [weight, bias]
        return params

    def _noise_active(self) -> bool:
        return self.training and self.noise_dropout > 0

    def _quantize_tokens(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize token rows ``h (b, n, e)`` -> codes ``(b, n, e)`` in h's dtype, indices ``(b, n, c)``, with vqp's
        steps around the quantizer: ``h @ R`` before and ``codes @ R.T`` after (``orthogonal_rotation``), and the
        noise dropout in training (indices come from the codes before the noise)."""
        c = self.num_codebooks
        dtype = h.dtype
        rotation = self._rotation_in_kernel(h)
        if rotation is not None:  # both products, the quantizer and any noise in one kernel
            codes, indices = self._quantize_feature(
                h.transpose(1, 2), channels_last=True, forward=True, noise=self._noise_active(), rotation=rotation)
            return codes.transpose(1, 2), indices
        if self.orthogonal_rotation:  # in float32, as vqp's float32 buffer makes it
            h = rearrange(rearrange(h.float(), "b n (c d) -> b n c d", c=c) @ self.orthogonal_rot.float(), "b n c d -> b n (c d)")
        noise_in_kernel = self._noise_in_kernel(h)
        codes, indices = self._quantize_feature(h.transpose(1, 2), channels_last=True, forward=True, noise=noise_in_kernel)
        codes = codes.transpose(1, 2)
        if self._noise_active() and not noise_in_kernel:
            codes = self._apply_noise(codes.float())
        if self.orthogonal_rotation:
            codes = rearrange(rearrange(codes.float(), "b n (c d) -> b n c d", c=c) @ self.orthogonal_rot.float().t(), "b n c d -> b n (c d)")
        return codes.to(dtype), indices

    def _rotation_in_kernel(self, h: torch.Tensor) -> torch.Tensor | None:
        """``R`` (float32, contiguous) where this call's orthogonal rotation runs in the kernel (the forward's, or the
        decode's with ``h`` the indices): on the Triton path, in a plain eager call (as the noise,
        :meth:`_noise_in_kernel`), ``R`` on ``h``'s device and needing no gradient (a buffer, as in vqp). Else None:
        torch.compile, export, torch.jit.trace, torch.func, dispatch modes and forward-mode AD take the products in
        torch ops around the kernels (a trace records the custom ops there, where it would record no kernel launch;
        their Functions have the ``jvp`` that the rotated ones lack)."""
        if not self.orthogonal_rotation or torch.jit.is_tracing():  # a trace must record the ops (not a launch)
            return None
        if torch.autograd.forward_ad._current_level >= 0:  # forward-mode AD: the kernels' Functions have no jvp
            return None
        rot = self.orthogonal_rot
        if rot.requires_grad or rot.device != h.device or rot.shape != (self.codebook_dim, self.codebook_dim):
            return None
        ops = self._triton_ops(h)
        if ops is None or not ops.noise_in_kernel(h) or not ops.noise_in_kernel(rot):
            return None
        return rot.float().contiguous()

    def _noise_in_kernel(self, h: torch.Tensor) -> bool:
        """Whether this call's noise dropout is drawn in the forward kernel (no noise tensor in memory): in training
        with noise, on the Triton path, in a plain eager call (``ops.noise_in_kernel``). torch.compile, export,
        torch.func and dispatch modes take :meth:`_apply_noise` (torch ops) instead."""
        if not self._noise_active():
            return False
        ops = self._triton_ops(h)
        return ops is not None and ops.noise_in_kernel(h)

    def _apply_noise(self, codes: torch.Tensor) -> torch.Tensor:
        """vqp's ``maybe_apply_noise``: with probability ``noise_dropout`` per element add ``U(-1/2, 1/2)``, then clamp
        to ``[-1, 1]`` (torch's generator, so ``torch.manual_seed`` makes it reproducible; done in torch ops).

        vqp 1.32 draws its mask with ``full_like(z, p).bernoulli_()``, whose default argument makes the probability
        0.5 whatever ``p`` is; here it is ``p``, as vqp documents the option."""
        offset_mask = torch.bernoulli(torch.full_like(codes, self.noise_dropout)).bool()
        offset = torch.rand_like(codes) - 0.5
        return torch.where(offset_mask, codes + offset, codes).clamp(-1.0, 1.0)

    def _forward_projected(self, z: torch.Tensor, is_img_or_video: bool):
        """project_in -> FSQ -> project_out. The projections follow the weights' dtype (the input is cast to it,
        autocast or not), the quantizer works in float32, and ``out`` comes back in the input's dtype.

        Plain ``nn.Linear`` projections run fused with the quantizer on the Triton path; anything else (a subclass,
        a hook, a parametrization, a replaced module) is called as a module, so it behaves as it would anywhere.
        """
        b = z.shape[0]
        spatial = z.shape[2:] if is_img_or_video else z.shape[1:2]
        dtype = _param_dtype(self.project_in, z.dtype)
        with _autocast_off(z.device.type):
            if self._fuses_projections() and not self._noise_active():
                feature = (z.flatten(2) if is_img_or_video else z.transpose(1, 2)).to(dtype)   # (b, dim, n)
                ops = self._triton_ops(feature)
                # orthogonal_rotation: in the fused kernel where it runs in the kernels (plain eager calls), else the
                # projections are called as modules around the rotated quantizer
                rotation = self._rotation_in_kernel(feature) if ops is not None else None
                if ops is not None and (rotation is not None or not self.orthogonal_rotation):
                    tables = level_tables(self.levels, z.device, self.bound_kind)
                    usage = self.usage_counts if self.track_usage else None
                    if usage is not None and usage.device != feature.device:
                        raise RuntimeError(
                            f"usage_counts is on {usage.device} and the input on {feature.device}: move the module with .to()"
                        )
                    if rotation is not None:  # h_c @ R quantized, code_c @ R.T projected out, in the one kernel
                        out, indices = ops.apply_quantize_projected_rotated(
                            feature, *self._projection_params(), rotation, tables.values, tables.integers,
                            self.num_codebooks, not is_img_or_video, self.return_indices, usage,
                        )
                    else:
                        out, indices = ops.apply_quantize_projected(  # the kernel counts usage itself (track_usage)
                            feature, *self._projection_params(), tables.values, tables.integers,
                            self.num_codebooks, not is_img_or_video, self.return_indices, usage,
                        )
                    out = out.reshape(b, self.dim, *spatial) if is_img_or_video else out.transpose(1, 2)
                    return out.to(z.dtype), indices if self.return_indices else None
            x = rearrange(z, "b d ... -> b (...) d") if is_img_or_video else z
            h = self.project_in(x.to(dtype))                                      # (b, n, e)
            if h.ndim != 3 or h.shape[-1] != self.effective_codebook_dim:
                raise ValueError(
                    f"project_in must map (b, n, {self.dim}) to (b, n, {self.effective_codebook_dim}) features "
                    f"(effective_codebook_dim), found {tuple(h.shape)}"
                )
            codes, indices = self._quantize_tokens(h)
            out = self.project_out(codes).to(z.dtype)                         # (b, n, dim)
        if is_img_or_video:
            out = rearrange(out.reshape(b, *spatial, out.shape[-1]), "b ... d -> b d ...")
        return out, indices

    # ----------------------------------------------------------------------------------------------
    # Codebook usage (track_usage=True)
    # ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _count_usage(self, indices: torch.Tensor) -> None:
        """Add the (b, n, c) indices to ``usage_counts`` (c, codebook_size) on the device: one ``index_add_`` of the
        indices (4 B per token and codebook), no host sync; a NaN token's index -1 adds nothing. (The PyTorch path
        only; the Triton forward kernels, plain and with fused projections, count in place themselves.)"""
        c, size = self.num_codebooks, self.codebook_size
        if torch.compiler.is_compiling() or not torch._C._functorch.is_functorch_wrapped_tensor(indices):
            self._add_counts(indices, c, size)
            return
        # Under torch.func (vmap, grad): every sample counts into the one histogram, which is no transform's input
        # (the transforms refuse an in-place update of a captured tensor), so count outside them.
        while torch._C._functorch.is_functorch_wrapped_tensor(indices):
            bdim = torch._C._functorch.maybe_get_bdim(indices)
            indices = torch._C._functorch.get_unwrapped(indices)
            indices = indices.movedim(bdim, 0) if bdim is not None and bdim >= 0 else indices
        from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack

        with temporarily_clear_interpreter_stack():
            self._add_counts(indices, c, size)

    def _add_counts(self, indices: torch.Tensor, c: int, size: int) -> None:
        flat = indices.reshape(-1, c)
        valid = flat >= 0
        slot = flat.clamp(min=0).to(torch.int64) + torch.arange(c, device=flat.device) * size
        self.usage_counts.view(-1).index_add_(0, slot.reshape(-1), valid.reshape(-1).to(torch.int64))

    def codebook_usage(self, all_reduce: bool = False) -> dict[str, torch.Tensor]:
        """Counts of the codes seen since construction or :meth:`reset_usage`, per codebook.

        Returns ``counts`` (c, codebook_size) int64, ``used_fraction`` (c,) (codes seen at least once / codebook_size)
        and ``perplexity`` (c,) (``exp`` of the entropy of the code frequencies; 0 before any code is counted), on the
        module's device, no host sync. ``all_reduce=True`` sums the counts over the ranks of the default
        ``torch.distributed`` process group first (every rank must call it), without changing the local counts.
        """
        if not self.track_usage:
            raise RuntimeError("codebook usage is tracked only with FSQ(..., track_usage=True)")
        counts = self.usage_counts.clone()
        if all_reduce and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        total = counts.sum(dim=-1, keepdim=True)
        probs = counts.double() / total.clamp(min=1)
        entropy = -(probs * probs.clamp(min=1e-300).log()).sum(dim=-1)
        perplexity = torch.where(total[:, 0] > 0, entropy.exp(), 0.0).float()
        used_fraction = ((counts > 0).sum(dim=-1).double() / self.codebook_size).float()
        return {"counts": counts, "used_fraction": used_fraction, "perplexity": perplexity}

    def reset_usage(self) -> None:
        """Zero the usage counts."""
        if not self.track_usage:
            raise RuntimeError("codebook usage is tracked only with FSQ(..., track_usage=True)")
        self.usage_counts.zero_()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(out, indices) = fsq(z)`` for ``z (b, n, dim)`` or channel-first ``(b, dim, *spatial)`` (and ``(b, dim, n)``
        with ``channel_first``); ``indices`` is None with ``return_indices=False``."""
        _check_float_tensor("z", z)
        if z.ndim < 3:
            raise ValueError(
                f"z must be a sequence (b, n, {self.dim}) or channel-first (b, {self.dim}, *spatial), "
                f"found shape {tuple(z.shape)}"
            )
        is_img_or_video = z.ndim >= 4 or self.channel_first  # channel-first input
        channels = z.shape[1] if is_img_or_video else z.shape[-1]
        if channels != self.dim:
            where = "dim 1 (channel-first)" if is_img_or_video else "the last dim (sequence)"
            raise ValueError(f"expected {self.dim} channels in {where} of z, found {channels} (shape {tuple(z.shape)})")
        b = z.shape[0]
        spatial = z.shape[2:] if is_img_or_video else z.shape[1:2]

        if self._calls_projections() or self.orthogonal_rotation or self._noise_active():
            out, indices = self._forward_projected(z, is_img_or_video)
        elif is_img_or_video:
            codes, indices = self._quantize_feature(z.flatten(2), channels_last=False, forward=True)
            out = codes.reshape(z.shape)
        else:
            codes, indices = self._quantize_feature(z.transpose(1, 2), channels_last=True, forward=True)
            out = codes.transpose(1, 2)

        if indices is None:  # return_indices=False (usage, if tracked, was counted with the codes)
            return out, None
        indices = indices.reshape(b, *spatial, self.num_codebooks)
        if not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)
        return out, indices
