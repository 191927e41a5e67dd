"""Gradients of the fused ops, of every order: the ops' registered autograd, and the autograd.Functions the module calls.

Feature view as in ``fsq.py``: ``(b, e, n)``, ``b`` batch, ``e = c * d`` channels (``c`` codebooks of
``d = len(levels)`` channels), ``n`` tokens; ``t = b * n`` token rows for the projections.

The math (straight-through estimator, as the reference's ``round_ste``): per element of channel ``j``,
with ``x = z + shift_j``, ``s_j = half_l_j / half_width_j`` and ``sech2 = 1 - tanh(x)^2``,

    quantize(z)                 -> code,      d code / d z = s * sech2(x)
    quantize_backward(g, z)     =  g * s * sech2(x)         (linear in g), whose own derivatives are
        d / d g:  quantize_backward(gg, z)
        d / d z:  gg * g * s * (-2 tanh(x) sech2(x))        (:func:`_curvature`, plain torch ops)

which is what autograd differentiates on the PyTorch path, so gradients of every order (gradient
penalties, Hessian-vector products) match it. The fused projections are ``h = x W_in^T + b_in``,
``code = quantize(h)``, ``out = code W_out^T + b_out``; their backward (:func:`_projected_grads`) is
written in those building blocks, so it is differentiable again wherever autograd asks for it
(``create_graph=True``), and is the plain launchers (no graph) otherwise.

``torch.func``: every Function here has a ``setup_context`` (``grad``, ``vjp``, ``jacrev``), a ``vmap``
rule that folds the vmapped dimension into the batch (vmap over the projection weights or the level
tables is refused with a ``NotImplementedError`` that says so), and a ``jvp`` (forward-mode AD, ``jvp``,
``jacfwd``). torch.compile cannot trace a custom ``jvp``, so while it traces, the ``apply_*`` entry points
use twins without one; while ``torch.jit.trace`` records, they call the custom ops themselves, which a
TorchScript graph can hold (the ops' registered autograd then supplies the gradient). The custom ops have
vmap rules of their own too (``_register_vmap``), for callers of ``torch.ops.fsq_triton.*`` under vmap.

No kernel lives here: the Functions run the launchers of ``fsq.py``/``fsq_projected.py`` (whose docstrings
state each kernel's math and memory traffic) and a few small ``torch`` products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from .. import torch_impl
from ..levels import COL_GRAD_SCALE, COL_SHIFT, COL_SMOOTH
from . import fsq, fsq_projected
from .fsq import _is_fake, backward_triton, decode_triton, forward_triton
from .fsq_projected import bias_or_none, decode_projected_triton, forward_projected_triton

_ops = torch.ops.fsq_triton


def op_or_launcher(op, launcher, *tensors: torch.Tensor):
    """The custom op while torch.compile or export trace (they must see the op), when a tensor is a
    torch.func wrapper or a fake tensor (the op's registered rules apply), or while a dispatch mode is active
    (a FlopCounterMode or DebugMode sees the op); else its Triton launcher.

    Eager calls skip the custom-op dispatcher layers (tens of microseconds, the whole cost of a tiny
    input) and run the same launcher the op would run.
    """
    if torch.compiler.is_compiling() or not fsq._runs_triton(tensors[0]):  # (the tensors share a device)
        return op
    for t in tensors:
        if t is not None and not (fsq._plain_eager(t) and not torch._C._functorch.is_functorch_wrapped_tensor(t)):
            return op
    return launcher


def _needs_no_autograd(*tensors: torch.Tensor | None) -> bool:
    """Whether a call records nothing for autograd: no input can carry a gradient (grad mode off, or none
    requires one) and no forward-mode AD level is open. Then the eager entry points skip the autograd.Function
    (whose ``apply`` binds its arguments with ``inspect.signature``, a large part of a tiny call's host time)."""
    if torch.autograd.forward_ad._current_level >= 0:
        return False
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def _tokens(feature: torch.Tensor) -> torch.Tensor:
    """(b, k, n) feature view <-> (b, n, k) token rows (a view)."""
    return feature.transpose(1, 2)


def _curvature(tangent: torch.Tensor, grad_out: torch.Tensor, z: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``d quantize_backward(g, z) / d z`` applied to ``tangent``: ``tangent * g * s * (-2 tanh(x) sech2(x))``.

    Plain torch ops on the feature view, in float32, so autograd differentiates it again. Returns z's dtype.
    """
    c = z.shape[1] // values.shape[0]
    t = (z.float() + torch_impl._per_channel(values[:, COL_SHIFT], c)).tanh()
    slope = torch_impl._per_channel(values[:, COL_GRAD_SCALE], c) * (-2.0 * t * (1.0 - t * t))
    # the hard clamps' gradient is piecewise constant: no curvature (smooth = 0)
    slope = torch.where(torch_impl._per_channel(values[:, COL_SMOOTH], c) != 0, slope, 0.0)
    return (tangent.float() * grad_out.float() * slope).to(z.dtype)


def _unsupported_vmap(what: str, in_dims) -> None:
    raise NotImplementedError(
        f"fsq_triton: vmap over {what} is not supported by the Triton path (in_dims={in_dims}); vmap over the "
        "input (or indices) only, or use FSQ(..., backend='torch')"
    )


def _fold(t: torch.Tensor | None, dim: int | None, size: int) -> torch.Tensor | None:
    """Move a vmapped dimension to the front (expanding an unbatched tensor) and fold it into the batch."""
    if t is None:
        return None
    t = t.expand(size, *t.shape) if dim is None else t.movedim(dim, 0)
    return t.reshape(size * t.shape[1], *t.shape[2:])


def _unfold(t: torch.Tensor, size: int) -> torch.Tensor:
    return t.reshape(size, t.shape[0] // size, *t.shape[1:])


# --------------------------------------------------------------------------------------------------
# quantize_backward: g, z -> g * s * sech2(z + shift)
# --------------------------------------------------------------------------------------------------


class _QuantizeBackward(torch.autograd.Function):
    """``dz = _QuantizeBackward.apply(grad_out, z, values, channels_last)``, differentiable in ``grad_out`` and ``z``."""

    @staticmethod
    def forward(grad_out, z, values, channels_last: bool):
        return op_or_launcher(_ops.quantize_backward, backward_triton, grad_out, z)(grad_out, z, values, channels_last)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_out, z, values, channels_last = inputs
        ctx.save_for_backward(grad_out, z, values)
        ctx.save_for_forward(grad_out, z, values)
        ctx.channels_last = channels_last

    @staticmethod
    def backward(ctx, gg):
        grad_out, z, values = ctx.saved_tensors
        d_grad = d_z = None
        if ctx.needs_input_grad[0]:
            d_grad = _apply(QuantizeBackwardFunction, _QuantizeBackward)(gg, z, values, ctx.channels_last)
        if ctx.needs_input_grad[1]:
            d_z = _curvature(gg, grad_out, z, values)
        return d_grad, d_z, None, None

    @staticmethod
    def vmap(info, in_dims, grad_out, z, values, channels_last):
        if in_dims[2] is not None:
            _unsupported_vmap("the level tables", in_dims)
        dz = QuantizeBackwardFunction.apply(
            _fold(grad_out, in_dims[0], info.batch_size), _fold(z, in_dims[1], info.batch_size), values, channels_last
        )
        return _unfold(dz, info.batch_size), 0


class QuantizeBackwardFunction(_QuantizeBackward):
    """:class:`_QuantizeBackward` with forward-mode AD (torch.compile traces the twin without ``jvp``)."""

    @staticmethod
    def jvp(ctx, grad_out_t, z_t, _values_t, _channels_last_t):
        grad_out, z, values = ctx.saved_tensors
        out_t = None
        if grad_out_t is not None:
            out_t = QuantizeBackwardFunction.apply(grad_out_t, z, values, ctx.channels_last)
        if z_t is not None:
            curvature = _curvature(z_t, grad_out, z, values)
            out_t = curvature if out_t is None else out_t + curvature
        return out_t


# --------------------------------------------------------------------------------------------------
# quantize: z -> (codes, indices)
# --------------------------------------------------------------------------------------------------


class _Quantize(torch.autograd.Function):
    @staticmethod
    def forward(z, values, integers, num_codebooks: int, channels_last: bool, write_indices: bool = True, usage=None):
        if usage is None:
            quantize_fn = op_or_launcher(_ops.quantize, forward_triton, z)
            return quantize_fn(z, values, integers, num_codebooks, channels_last, write_indices)
        quantize_fn = op_or_launcher(_ops.quantize_counted, forward_triton, z)
        return quantize_fn(z, values, integers, num_codebooks, channels_last, write_indices, usage)

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, values, _integers, _num_codebooks, channels_last, _write_indices, _usage = inputs
        ctx.save_for_backward(z, values)
        ctx.save_for_forward(z, values)
        ctx.channels_last = channels_last
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_out, _grad_indices):
        z, values = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a backward that has a backward of its own
            grad_z = _apply(QuantizeBackwardFunction, _QuantizeBackward)(grad_out, z, values, ctx.channels_last)
        else:
            grad_z = op_or_launcher(_ops.quantize_backward, backward_triton, grad_out, z)(grad_out, z, values, ctx.channels_last)
        return grad_z, None, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, z, values, integers, num_codebooks, channels_last, write_indices, usage):
        if in_dims[0] is None or any(dim is not None for dim in (in_dims[1], in_dims[2], in_dims[6])):
            _unsupported_vmap("the level tables or the usage counts", in_dims)
        out, indices = FSQFunction.apply(
            _fold(z, in_dims[0], info.batch_size), values, integers, num_codebooks, channels_last, write_indices, usage
        )
        if not write_indices:  # the empty (0,) stand-in has no batch
            return (_unfold(out, info.batch_size), indices), (0, None)
        return (_unfold(out, info.batch_size), _unfold(indices, info.batch_size)), (0, 0)


class FSQFunction(_Quantize):
    """``(out, indices) = FSQFunction.apply(z, values, integers, num_codebooks, channels_last, write_indices=True,
    usage=None)`` on the feature view.

    Forward runs the fused quantizer (``fsq_triton::quantize``, or with ``usage`` the mutating
    ``fsq_triton::quantize_counted``, which adds the codes to that histogram in the same kernel; or their
    launcher directly in eager mode); ``write_indices=False`` gives an empty ``(0,)`` ``indices``;
    backward runs ``quantize_backward`` from the saved input alone (the straight-through estimator: rounding
    passes the gradient, the tanh bound scales it), differentiable again under ``create_graph``.
    ``indices`` is not differentiable. Supports ``torch.func`` (grad, vmap, jvp) and forward-mode AD.
    """

    @staticmethod
    def jvp(ctx, z_t, _values_t, _integers_t, _num_codebooks_t, _channels_last_t, *_):
        z, values = ctx.saved_tensors
        return QuantizeBackwardFunction.apply(z_t, z, values, ctx.channels_last), None


# --------------------------------------------------------------------------------------------------
# project_in -> quantize -> project_out
# --------------------------------------------------------------------------------------------------


def _projected_grads(ctx, grad_out, x, w_in, b_in, w_out, h, values, integers, num_codebooks, quantize_fn, backward_fn):
    """Gradients of ``out`` for (x, w_in, b_in, w_out, b_out), in the building blocks ``quantize_fn``/``backward_fn``.

    With differentiable building blocks and grad mode on (``create_graph``), ``h`` carries project_in's graph
    (its value stays the forward's saved ``h``, so the codes are the forward's), and every product below is
    recorded: the result is differentiable again. ``h`` may be empty (not saved): it is then recomputed.
    """
    b, dim, n = x.shape
    e = w_in.shape[0]
    dtype = w_in.dtype
    differentiable = torch.is_grad_enabled()
    x_tok = _tokens(x).reshape(b * n, dim)                                         # (t, dim)
    if differentiable or h.numel() == 0:
        h_graph = F.linear(x_tok, w_in, bias_or_none(b_in)).float()                              # (t, e)
        h_value = h_graph.detach() if h.numel() == 0 else h.reshape(b * n, e)
        h_tok = h_value + (h_graph - h_graph.detach()) if differentiable else h_value
    else:
        h_tok = h.reshape(b * n, e)
    h_feature = h_tok.t()[None]                                                     # (1, e, t)
    g = _tokens(grad_out).reshape(b * n, dim).to(dtype)                             # (t, dim)

    need_x, need_w_in, need_b_in, need_w_out, need_b_out = ctx.needs_input_grad[:5]
    grad_x = grad_w_in = grad_b_in = grad_w_out = grad_b_out = None
    if need_x or need_w_in or need_b_in:
        grad_codes = (g @ w_out).float()                                            # (t, e)
        grad_h = backward_fn(grad_codes.t()[None], h_feature, values, True)         # (1, e, t)
        grad_h = grad_h[0].t().to(dtype)                                            # (t, e)
        if need_x:
            grad_x = _tokens((grad_h @ w_in).reshape(b, n, dim))                    # (b, dim, n)
        if need_w_in:
            grad_w_in = grad_h.t() @ x_tok
        if need_b_in:
            grad_b_in = grad_h.sum(dim=0)
    if need_w_out:
        codes, _ = quantize_fn(h_feature, values, integers, num_codebooks, True)[:2]
        grad_w_out = g.t() @ codes[0].t().to(dtype)
    if need_b_out:
        grad_b_out = g.sum(dim=0)
    return grad_x, grad_w_in, grad_b_in, grad_w_out, grad_b_out


class _QuantizeProjected(torch.autograd.Function):
    @staticmethod
    def forward(x, w_in, b_in, w_out, b_out, values, integers, num_codebooks: int, channels_last: bool, save_h: bool,
                write_indices: bool = True, usage=None):
        args = (x, w_in, b_in, w_out, b_out, values, integers, num_codebooks, channels_last, save_h, write_indices)
        if usage is None:
            return op_or_launcher(_ops.quantize_projected, forward_projected_triton, x, w_in, b_in, w_out, b_out)(*args)
        quantize_fn = op_or_launcher(_ops.quantize_projected_counted, forward_projected_triton, x, w_in, b_in, w_out, b_out)
        return quantize_fn(*args, usage)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w_in, b_in, w_out, _b_out, values, integers, num_codebooks, _channels_last, _save_h, _write, _usage = inputs
        _out, indices, h = output
        ctx.save_for_backward(x, w_in, b_in, w_out, h, values, integers)
        ctx.save_for_forward(x, w_in, b_in, w_out, h, values, integers)
        ctx.num_codebooks = num_codebooks
        ctx.mark_non_differentiable(indices, h)

    @staticmethod
    def backward(ctx, grad_out, _grad_indices, _grad_h):
        x, w_in, b_in, w_out, h, values, integers = ctx.saved_tensors
        if torch.is_grad_enabled():
            quantize_fn = _apply(FSQFunction, _Quantize)
            backward_fn = _apply(QuantizeBackwardFunction, _QuantizeBackward)
        else:
            quantize_fn = op_or_launcher(_ops.quantize, forward_triton, x, h, grad_out)
            backward_fn = op_or_launcher(_ops.quantize_backward, backward_triton, x, h, grad_out)
        grads = _projected_grads(ctx, grad_out, x, w_in, b_in, w_out, h, values, integers, ctx.num_codebooks,
                                 quantize_fn, backward_fn)
        return (*grads, None, None, None, None, None, None, None)

    @staticmethod
    def vmap(info, in_dims, x, w_in, b_in, w_out, b_out, values, integers, num_codebooks, channels_last, save_h,
             write_indices, usage):
        if in_dims[0] is None or any(dim is not None for dim in (*in_dims[1:7], in_dims[11])):
            _unsupported_vmap("the projection weights, the level tables or the usage counts", in_dims)
        size = info.batch_size
        results = FSQProjectedFunction.apply(
            _fold(x, in_dims[0], size), w_in, b_in, w_out, b_out, values, integers, num_codebooks, channels_last, save_h,
            write_indices, usage,
        )
        # empty (0,) stand-ins (indices without write_indices, h without save_h) have no batch
        return (tuple(t if t.numel() == 0 and t.ndim == 1 else _unfold(t, size) for t in results),
                tuple(None if t.numel() == 0 and t.ndim == 1 else 0 for t in results))


class FSQProjectedFunction(_QuantizeProjected):
    """``(out, indices, h) = FSQProjectedFunction.apply(x, w_in, b_in, w_out, b_out, values, integers, c, channels_last,
    save_h, write_indices=True, usage=None)``.

    ``x`` is the feature view ``(b, dim, n)`` in the weights' dtype. The forward is one fused kernel
    (``fsq_triton::quantize_projected``, or with ``usage`` the mutating ``fsq_triton::quantize_projected_counted``,
    which adds the codes to that ``(c, codebook_size)`` int64 histogram in the same kernel); ``write_indices=False``
    gives an empty ``(0,)`` ``indices``; with ``save_h`` it also returns ``h (b, n, e)`` float32 (``e`` floats per
    token, not differentiable), which the backward uses instead of running ``project_in`` again (without it, ``h`` is
    recomputed there). The gradients do not depend on ``write_indices`` or ``usage``. Supports ``create_graph``,
    ``torch.func`` (grad, vmap over ``x``, jvp) and forward-mode AD.
    """

    @staticmethod
    def jvp(ctx, x_t, w_in_t, b_in_t, w_out_t, b_out_t, *_):
        x, w_in, b_in, w_out, h, values, integers = ctx.saved_tensors
        b, dim, n = x.shape
        e = w_in.shape[0]
        dtype = w_in.dtype
        x_tok = _tokens(x).reshape(b * n, dim)
        h_tok = F.linear(x_tok, w_in, bias_or_none(b_in)).float() if h.numel() == 0 else h.reshape(b * n, e)
        h_feature = h_tok.t()[None]                                                 # (1, e, t)
        out_t = None

        def add(term):
            nonlocal out_t
            out_t = term if out_t is None else out_t + term

        h_t = None
        for term in (
            None if x_t is None else _tokens(x_t).reshape(b * n, dim) @ w_in.t(),
            None if w_in_t is None else x_tok @ w_in_t.t(),
            None if b_in_t is None else b_in_t.expand(b * n, e),
        ):
            if term is not None:
                h_t = term if h_t is None else h_t + term
        if h_t is not None:  # straight-through: d code = s * sech2(h) * d h
            codes_t = QuantizeBackwardFunction.apply(h_t.float().t()[None], h_feature, values, True)[0].t().to(dtype)
            add(codes_t @ w_out.t())
        if w_out_t is not None:
            codes, _ = FSQFunction.apply(h_feature, values, integers, ctx.num_codebooks, True)
            add(codes[0].t().to(dtype) @ w_out_t.t())
        if b_out_t is not None:
            add(b_out_t.expand(b * n, dim))
        if out_t is not None:
            out_t = _tokens(out_t.reshape(b, n, dim))
        return out_t, None, None


# --------------------------------------------------------------------------------------------------
# indices -> codes -> project_out
# --------------------------------------------------------------------------------------------------


def _decoded_codes(indices, values, integers, codebook_size: int, dtype) -> torch.Tensor:
    """Codes of ``indices (b, n, c)`` as token rows ``(t, e)`` in ``dtype`` (what the fused decode multiplies)."""
    decode = op_or_launcher(_ops.indices_to_codes, decode_triton, indices)
    codes = decode(indices, values, integers, codebook_size, True, dtype)          # (b, e, n)
    return _tokens(codes).reshape(-1, codes.shape[1])


class _IndicesToCodesProjected(torch.autograd.Function):
    @staticmethod
    def forward(indices, w_out, b_out, values, integers, codebook_size: int, channels_last: bool):
        decode = op_or_launcher(_ops.indices_to_codes_projected, decode_projected_triton, indices, w_out, b_out)
        return decode(indices, w_out, b_out, values, integers, codebook_size, channels_last)

    @staticmethod
    def setup_context(ctx, inputs, output):
        indices, w_out, _b_out, values, integers, codebook_size, _channels_last = inputs
        ctx.save_for_backward(indices, w_out, values, integers)
        ctx.save_for_forward(indices, w_out, values, integers)
        ctx.codebook_size = codebook_size

    @staticmethod
    def backward(ctx, grad_out):
        indices, w_out, values, integers = ctx.saved_tensors
        return (None, *_decode_projected_grads(ctx, grad_out, indices, w_out, values, integers, ctx.codebook_size),
                None, None, None, None)

    @staticmethod
    def vmap(info, in_dims, indices, w_out, b_out, values, integers, codebook_size, channels_last):
        if in_dims[0] is None or any(dim is not None for dim in in_dims[1:5]):
            _unsupported_vmap("the projection weights or the level tables", in_dims)
        out = IndicesToCodesProjectedFunction.apply(
            _fold(indices, in_dims[0], info.batch_size), w_out, b_out, values, integers, codebook_size, channels_last
        )
        return _unfold(out, info.batch_size), 0


def _decode_projected_grads(ctx, grad_out, indices, w_out, values, integers, codebook_size):
    """(grad_w_out, grad_b_out) of ``out = codes W_out^T + b_out``: plain products, differentiable in ``grad_out``."""
    dim = w_out.shape[0]
    g = _tokens(grad_out).reshape(-1, dim).to(w_out.dtype)                          # (t, dim)
    grad_w_out = grad_b_out = None
    if ctx.needs_input_grad[1]:
        grad_w_out = g.t() @ _decoded_codes(indices, values, integers, codebook_size, w_out.dtype)
    if ctx.needs_input_grad[2]:
        grad_b_out = g.sum(dim=0)
    return grad_w_out, grad_b_out


class IndicesToCodesProjectedFunction(_IndicesToCodesProjected):
    """``out = IndicesToCodesProjectedFunction.apply(indices, w_out, b_out, values, integers, codebook_size, channels_last)``.

    Decode and ``project_out`` in one kernel, ``out (b, dim, n)`` in the weights' dtype, differentiable with
    respect to ``w_out`` and ``b_out`` (decoder fine-tuning on stored tokens): ``grad_w_out = g^T codes``,
    ``grad_b_out = sum g``. Supports ``create_graph``, ``torch.func`` (grad, vmap over ``indices``, jvp).
    """

    @staticmethod
    def jvp(ctx, _indices_t, w_out_t, b_out_t, *_):
        indices, w_out, values, integers = ctx.saved_tensors
        b, n, _c = indices.shape
        dim = w_out.shape[0]
        out_t = None
        if w_out_t is not None:
            out_t = _decoded_codes(indices, values, integers, ctx.codebook_size, w_out.dtype) @ w_out_t.t()
        if b_out_t is not None:
            out_t = b_out_t.expand(b * n, dim) if out_t is None else out_t + b_out_t
        return None if out_t is None else _tokens(out_t.reshape(b, n, dim))


# --------------------------------------------------------------------------------------------------
# Entry points for the module, and the custom ops' own autograd
# --------------------------------------------------------------------------------------------------


def _apply(eager: type[torch.autograd.Function], traceable: type[torch.autograd.Function]):
    """``eager.apply``, or while torch.compile traces, the twin without a custom ``jvp`` (which Dynamo refuses)."""
    return traceable.apply if torch.compiler.is_compiling() else eager.apply


def apply_quantize(z, values, integers, num_codebooks: int, channels_last: bool, write_indices: bool = True, usage=None):
    """Differentiable fused quantizer on the feature view: ``(codes (b, e, n), indices (b, n, c) int32)``.

    ``write_indices=False``: ``indices`` is an empty ``(0,)`` tensor (the kernel neither reduces nor stores them).
    ``usage``: a ``(c, codebook_size)`` int64 histogram the kernel adds each token's code to, in place."""
    args = (z, values, integers, num_codebooks, channels_last, write_indices)
    if torch.jit.is_tracing():
        return _ops.quantize(*args) if usage is None else _ops.quantize_counted(*args, usage)
    if _needs_no_autograd(z) and op_or_launcher(_ops.quantize, forward_triton, z) is forward_triton:
        return forward_triton(*args, usage)
    return _apply(FSQFunction, _Quantize)(*args, usage)


class NoisyQuantizeFunction(torch.autograd.Function):
    """``(out, indices) = NoisyQuantizeFunction.apply(z, values, integers, c, channels_last, write_indices, usage, seed, p)``:
    the fused quantizer with vqp's noise dropout drawn in the kernel (:func:`fsq.noise_dropout`), eager only.

    The backward redraws the same noise from ``seed`` and passes no gradient where its clamp cut a noisy code (as
    autograd through vqp's ``clamp`` does). Used only for plain eager calls (:func:`noise_in_kernel`); a gradient
    of that gradient (``create_graph=True``) raises ``NotImplementedError`` (the PyTorch backend has it).
    """

    @staticmethod
    def forward(ctx, z, values, integers, num_codebooks, channels_last, write_indices, usage, seed, p):
        out, indices = forward_triton(z, values, integers, num_codebooks, channels_last, write_indices, usage, (seed, p))
        ctx.save_for_backward(z, values)
        ctx.channels_last, ctx.noise = channels_last, (seed, p)
        ctx.mark_non_differentiable(indices)
        return out, indices

    @staticmethod
    def backward(ctx, grad_out, _grad_indices):
        if torch.is_grad_enabled():
            raise NotImplementedError(
                "fsq_triton: a gradient of the gradient (create_graph=True) through noise_dropout's in-kernel noise is "
                "not supported; use backend='torch' for that training step")
        z, values = ctx.saved_tensors
        grad_z = backward_triton(grad_out, z, values, ctx.channels_last, ctx.noise)  # element ids: any strides
        return grad_z, None, None, None, None, None, None, None, None


def noise_in_kernel(z: torch.Tensor) -> bool:
    """Whether noise dropout on ``z`` runs in the kernel: a plain eager call (no torch.compile, export, torch.func
    transform or dispatch mode, which take the noise in torch ops instead) on the Triton path."""
    return op_or_launcher(_ops.quantize, forward_triton, z) is forward_triton


def apply_quantize_noisy(z, values, integers, num_codebooks: int, channels_last: bool, write_indices: bool, usage, p: float):
    """:func:`apply_quantize` with vqp's noise dropout of probability ``p`` drawn in the kernel, seeded from torch's
    CPU generator (so ``torch.manual_seed`` reproduces it; drawing it costs no device sync)."""
    seed = int(torch.randint(0, 2**31 - 2, (), device="cpu"))
    return NoisyQuantizeFunction.apply(z, values, integers, num_codebooks, channels_last, write_indices, usage, seed, p)


def _rotate_codebooks(feature: torch.Tensor, rotation: torch.Tensor, num_codebooks: int) -> torch.Tensor:
    """``(b, c*d, n)`` -> per token and codebook ``t_c @ rotation`` in float32, torch ops (differentiable)."""
    t = rearrange(feature.float(), "b (c d) n -> b n c d", c=num_codebooks) @ rotation
    return rearrange(t, "b n c d -> b (c d) n")


class RotatedQuantizeFunction(torch.autograd.Function):
    """``(out, indices) = RotatedQuantizeFunction.apply(z, rotation, values, integers, c, channels_last, write_indices,
    usage, noise)``: the fused quantizer with vqp's orthogonal rotation in the kernel (``ROTATE``): it quantizes
    ``z_c @ R`` and writes ``codes_c @ R.T``, per token and codebook; ``noise`` is ``None`` or the in-kernel noise
    dropout's ``(seed, p)``. Eager only (:func:`noise_in_kernel` decides), ``R`` a buffer (no gradient).

    The backward is the kernel's ``((g @ R) * d code / d y) @ R.T``, recomputed from ``z``. Asked for a graph
    (``create_graph=True``), it is written in torch ops around ``fsq_triton::quantize_backward`` instead, so it can be
    differentiated again (with the in-kernel noise, that raises ``NotImplementedError``, as without rotation).
    """

    @staticmethod
    def forward(ctx, z, rotation, values, integers, num_codebooks, channels_last, write_indices, usage, noise):
        out, indices = forward_triton(z, values, integers, num_codebooks, channels_last, write_indices, usage, noise,
                                      rotation=rotation)
        ctx.save_for_backward(z, rotation, values)
        ctx.channels_last, ctx.noise, ctx.num_codebooks = channels_last, noise, num_codebooks
        ctx.mark_non_differentiable(indices)
        return out, indices

    @staticmethod
    def backward(ctx, grad_out, _grad_indices):
        z, rotation, values = ctx.saved_tensors
        if not torch.is_grad_enabled():
            grad_z = backward_triton(grad_out, z, values, ctx.channels_last, ctx.noise, rotation=rotation)
        elif ctx.noise is not None:
            raise NotImplementedError(
                "fsq_triton: a gradient of the gradient (create_graph=True) through noise_dropout's in-kernel noise is "
                "not supported; use backend='torch' for that training step")
        else:
            c = ctx.num_codebooks
            y = _rotate_codebooks(z, rotation, c)
            g_y = _ops.quantize_backward(_rotate_codebooks(grad_out, rotation, c), y, values, ctx.channels_last)
            grad_z = _rotate_codebooks(g_y, rotation.t(), c).to(z.dtype)
        return grad_z, None, None, None, None, None, None, None, None


def apply_quantize_rotated(z, rotation, values, integers, num_codebooks: int, channels_last: bool, write_indices: bool,
                           usage, noise_p: float | None):
    """:func:`apply_quantize` with vqp's orthogonal rotation ``rotation (d, d)`` (float32, contiguous, on z's device)
    in the kernel, and with ``noise_p``, vqp's noise dropout drawn there too (seeded as :func:`apply_quantize_noisy`).
    For plain eager calls only (:func:`noise_in_kernel`)."""
    noise = None
    if noise_p is not None:
        noise = (int(torch.randint(0, 2**31 - 2, (), device="cpu")), noise_p)
    if noise is None and _needs_no_autograd(z):
        return forward_triton(z, values, integers, num_codebooks, channels_last, write_indices, usage, rotation=rotation)
    return RotatedQuantizeFunction.apply(
        z, rotation, values, integers, num_codebooks, channels_last, write_indices, usage, noise)


def _rotated_building_blocks(rotation: torch.Tensor, num_codebooks: int, graph: bool):
    """``(quantize_fn, backward_fn)`` for :func:`_projected_grads` with vqp's orthogonal rotation around the quantizer:
    ``quantize_fn(h)`` gives ``codes(h_c @ R)_c @ R.T`` and ``backward_fn(g, h)`` gives
    ``((g_c @ R) * d code / d y (h_c @ R))_c @ R.T``, per codebook. Without a graph, the plain kernels with ``ROTATE``;
    with one (``create_graph``), torch ops around ``fsq_triton::quantize_backward`` and the quantizer (as
    :meth:`RotatedQuantizeFunction.backward`), so that autograd can differentiate them again."""
    c = num_codebooks
    if not graph:
        def quantize_fn(h, values, integers, _c, channels_last):
            return forward_triton(h, values, integers, c, channels_last, rotation=rotation)

        def backward_fn(g, h, values, channels_last):
            return backward_triton(g, h, values, channels_last, rotation=rotation)

        return quantize_fn, backward_fn

    def quantize_graph(h, values, integers, _c, channels_last):
        codes, indices = FSQFunction.apply(_rotate_codebooks(h, rotation, c), values, integers, c, channels_last)
        return _rotate_codebooks(codes, rotation.t(), c), indices

    def backward_graph(g, h, values, channels_last):
        g_y = _ops.quantize_backward(_rotate_codebooks(g, rotation, c), _rotate_codebooks(h, rotation, c), values,
                                     channels_last)
        return _rotate_codebooks(g_y, rotation.t(), c)

    return quantize_graph, backward_graph


class RotatedProjectedFunction(torch.autograd.Function):
    """``(out, indices) = RotatedProjectedFunction.apply(x, w_in, b_in, w_out, b_out, rotation, values, integers, c,
    channels_last, save_h, write_indices, usage)``: the fused projections with vqp's orthogonal rotation in the kernel
    (``ROTATE``): ``h = x W_in^T + b_in``, per codebook ``y_c = h_c @ R`` quantized, ``code_c @ R.T`` projected out.
    Eager only (:func:`noise_in_kernel` decides), ``R`` a buffer (no gradient).

    The backward is :func:`_projected_grads` on the saved ``h`` (recomputed when not saved), whose quantizer steps
    carry the rotation (:func:`_rotated_building_blocks`): the rotated straight-through gradient from the backward
    kernel with ``ROTATE``, or under ``create_graph`` torch ops around ``fsq_triton::quantize_backward``, so that a
    gradient of the gradient works as on the unrotated path.
    """

    @staticmethod
    def forward(ctx, x, w_in, b_in, w_out, b_out, rotation, values, integers, num_codebooks, channels_last, save_h,
                write_indices, usage):
        out, indices, h = forward_projected_triton(x, w_in, b_in, w_out, b_out, values, integers, num_codebooks,
                                                   channels_last, save_h, write_indices, usage, rotation=rotation)
        ctx.save_for_backward(x, w_in, b_in, w_out, h, values, integers, rotation)
        ctx.num_codebooks = num_codebooks
        ctx.mark_non_differentiable(indices)
        return out, indices

    @staticmethod
    def backward(ctx, grad_out, _grad_indices):
        x, w_in, b_in, w_out, h, values, integers, rotation = ctx.saved_tensors
        quantize_fn, backward_fn = _rotated_building_blocks(rotation, ctx.num_codebooks, torch.is_grad_enabled())
        grads = _projected_grads(ctx, grad_out, x, w_in, b_in, w_out, h, values, integers, ctx.num_codebooks,
                                 quantize_fn, backward_fn)
        return (*grads, None, None, None, None, None, None, None, None)


def apply_quantize_projected_rotated(x, w_in, b_in, w_out, b_out, rotation, values, integers, num_codebooks: int,
                                     channels_last: bool, write_indices: bool = True, usage=None):
    """:func:`apply_quantize_projected` with vqp's orthogonal rotation ``rotation (d, d)`` (float32, contiguous, on x's
    device, a buffer: no gradient) in the fused kernel: ``(out (b, dim, n), indices (b, n, c))``. For plain eager calls
    only (:func:`noise_in_kernel`); the rotation's products never leave the kernel."""
    save_h = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w_in, b_in, w_out, b_out))
    if not save_h and _needs_no_autograd(x, w_in, b_in, w_out, b_out):
        out, indices, _ = forward_projected_triton(x, w_in, b_in, w_out, b_out, values, integers, num_codebooks,
                                                   channels_last, False, write_indices, usage, rotation=rotation)
        return out, indices
    return RotatedProjectedFunction.apply(x, w_in, b_in, w_out, b_out, rotation, values, integers, num_codebooks,
                                          channels_last, save_h, write_indices, usage)


def apply_quantize_projected(x, w_in, b_in, w_out, b_out, values, integers, num_codebooks: int, channels_last: bool,
                             write_indices: bool = True, usage=None):
    """Differentiable fused project_in -> quantize -> project_out: ``(out (b, dim, n), indices (b, n, c))``.

    ``h`` is saved for the backward only when a gradient can be asked for. ``write_indices=False``: ``indices`` is an
    empty ``(0,)`` tensor (the kernel stores none). ``usage``: a ``(c, codebook_size)`` int64 histogram the kernel adds
    each token's code to, in place, in the same pass.
    """
    save_h = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w_in, b_in, w_out, b_out))
    args = (x, w_in, b_in, w_out, b_out, values, integers, num_codebooks, channels_last, save_h, write_indices)
    if torch.jit.is_tracing():
        if usage is None:
            out, indices, _ = _ops.quantize_projected(*args)
        else:
            out, indices, _ = _ops.quantize_projected_counted(*args, usage)
    elif not save_h and _needs_no_autograd(x, w_in, b_in, w_out, b_out) and op_or_launcher(
        _ops.quantize_projected, forward_projected_triton, x, w_in, b_in, w_out, b_out
    ) is forward_projected_triton:
        out, indices, _ = forward_projected_triton(*args, usage)
    else:
        out, indices, _ = _apply(FSQProjectedFunction, _QuantizeProjected)(*args, usage)
    return out, indices


def apply_indices_to_codes(indices, values, integers, codebook_size: int, channels_last: bool, dtype: torch.dtype):
    """Fused decode, ``(b, n, c)`` -> ``(b, e, n)`` in ``dtype`` (no differentiable input: integer indices)."""
    args = (indices, values, integers, codebook_size, channels_last, dtype)
    if torch.jit.is_tracing():
        return _ops.indices_to_codes(*args)
    return op_or_launcher(_ops.indices_to_codes, decode_triton, indices)(*args)


def decode_rotated(indices, rotation, values, integers, codebook_size: int, channels_last: bool, dtype: torch.dtype):
    """:func:`apply_indices_to_codes` with vqp's orthogonal rotation in the decode kernel: ``codes_c @ R.T`` per token
    (``R`` float32, contiguous, a buffer: no gradient). Plain eager calls only (:func:`noise_in_kernel`)."""
    return decode_triton(indices, values, integers, codebook_size, channels_last, dtype, rotation=rotation)


class RotatedDecodeProjectedFunction(torch.autograd.Function):
    """``out = RotatedDecodeProjectedFunction.apply(indices, w_out, b_out, rotation, values, integers, codebook_size,
    channels_last)``: :class:`IndicesToCodesProjectedFunction` with vqp's orthogonal rotation in the decode kernel
    (``code_c @ R.T`` before ``project_out``; ``R`` a buffer, no gradient). Eager only. The backward is
    ``grad_w_out = g^T codes`` (the rotated codes, from the plain decode kernel with ``ROTATE``) and
    ``grad_b_out = sum g``: torch products in ``g``, so differentiable again under ``create_graph``."""

    @staticmethod
    def forward(ctx, indices, w_out, b_out, rotation, values, integers, codebook_size, channels_last):
        ctx.save_for_backward(indices, w_out, rotation, values, integers)
        ctx.codebook_size = codebook_size
        return decode_projected_triton(indices, w_out, b_out, values, integers, codebook_size, channels_last,
                                       rotation=rotation)

    @staticmethod
    def backward(ctx, grad_out):
        indices, w_out, rotation, values, integers = ctx.saved_tensors
        dim = w_out.shape[0]
        g = _tokens(grad_out).reshape(-1, dim).to(w_out.dtype)                      # (t, dim)
        grad_w_out = grad_b_out = None
        if ctx.needs_input_grad[1]:
            codes = decode_triton(indices, values, integers, ctx.codebook_size, True, w_out.dtype, rotation=rotation)
            grad_w_out = g.t() @ _tokens(codes).reshape(-1, codes.shape[1])
        if ctx.needs_input_grad[2]:
            grad_b_out = g.sum(dim=0)
        return None, grad_w_out, grad_b_out, None, None, None, None, None


def decode_projected_rotated(indices, w_out, b_out, rotation, values, integers, codebook_size: int,
                             channels_last: bool):
    """:func:`apply_indices_to_codes_projected` with vqp's orthogonal rotation ``rotation (d, d)`` (float32,
    contiguous, on the indices' device) in the fused decode: ``(b, dim, n)`` in the weights' dtype, differentiable in
    ``w_out`` and ``b_out``. Plain eager calls only (:func:`noise_in_kernel`)."""
    if _needs_no_autograd(w_out, b_out):
        return decode_projected_triton(indices, w_out, b_out, values, integers, codebook_size, channels_last,
                                       rotation=rotation)
    return RotatedDecodeProjectedFunction.apply(indices, w_out, b_out, rotation, values, integers, codebook_size,
                                                channels_last)


def apply_indices_to_codes_projected(indices, w_out, b_out, values, integers, codebook_size: int, channels_last: bool):
    """Differentiable (in ``w_out``, ``b_out``) fused decode with ``project_out``: ``(b, dim, n)``."""
    args = (indices, w_out, b_out, values, integers, codebook_size, channels_last)
    if torch.jit.is_tracing():
        return _ops.indices_to_codes_projected(*args)
    return _apply(IndicesToCodesProjectedFunction, _IndicesToCodesProjected)(*args)


def _quantize_setup(ctx, inputs, output):
    z, values, _integers, _num_codebooks, channels_last, _write_indices = inputs
    ctx.save_for_backward(z, values)
    ctx.channels_last = channels_last
    ctx.mark_non_differentiable(output[1])


def _quantize_grad(ctx, grad_out, _grad_indices):
    z, values = ctx.saved_tensors
    return _ops.quantize_backward(grad_out, z, values, ctx.channels_last), None, None, None, None, None


def _quantize_backward_setup(ctx, inputs, output):
    grad_out, z, values, channels_last = inputs
    ctx.save_for_backward(grad_out, z, values)
    ctx.channels_last = channels_last


def _quantize_backward_grad(ctx, gg):
    grad_out, z, values = ctx.saved_tensors
    d_grad = _ops.quantize_backward(gg, z, values, ctx.channels_last) if ctx.needs_input_grad[0] else None
    d_z = _curvature(gg, grad_out, z, values) if ctx.needs_input_grad[1] else None
    return d_grad, d_z, None, None


def _quantize_projected_setup(ctx, inputs, output):
    x, w_in, b_in, w_out, _b_out, values, integers, num_codebooks, _channels_last, _save_h, _write_indices = inputs
    ctx.save_for_backward(x, w_in, b_in, w_out, output[2], values, integers)
    ctx.num_codebooks = num_codebooks
    ctx.mark_non_differentiable(output[1], output[2])


def _quantize_projected_grad(ctx, grad_out, _grad_indices, _grad_h):
    x, w_in, b_in, w_out, h, values, integers = ctx.saved_tensors
    grads = _projected_grads(ctx, grad_out, x, w_in, b_in, w_out, h, values, integers, ctx.num_codebooks,
                             _ops.quantize, _ops.quantize_backward)
    return (*grads, None, None, None, None, None, None)


def _indices_to_codes_projected_setup(ctx, inputs, output):
    indices, w_out, _b_out, values, integers, codebook_size, _channels_last = inputs
    ctx.save_for_backward(indices, w_out, values, integers)
    ctx.codebook_size = codebook_size


def _indices_to_codes_projected_grad(ctx, grad_out):
    indices, w_out, values, integers = ctx.saved_tensors
    return (None, *_decode_projected_grads(ctx, grad_out, indices, w_out, values, integers, ctx.codebook_size),
            None, None, None, None)


# Each op's own gradient, for callers of torch.ops.fsq_triton.* (and for torch.compile/export, which see the
# ops): the same formulas as the Functions above, in the ops themselves, so that create_graph works there too.
# (indices_to_codes has no differentiable input: its inputs are integer indices and the level tables.)
fsq.quantize.register_autograd(_quantize_grad, setup_context=_quantize_setup)
fsq.quantize_backward.register_autograd(_quantize_backward_grad, setup_context=_quantize_backward_setup)
fsq_projected.quantize_projected.register_autograd(_quantize_projected_grad, setup_context=_quantize_projected_setup)
fsq_projected.indices_to_codes_projected.register_autograd(
    _indices_to_codes_projected_grad, setup_context=_indices_to_codes_projected_setup
)


def _register_vmap(op, batchable: tuple[int, ...], what: str) -> None:
    """vmap of a custom op called directly: the vmapped dimension folds into the batch of the ``batchable``
    arguments (an unbatched one among them is expanded); vmap over any other tensor argument is refused."""

    def rule(info, in_dims, *args):
        tensor_dims = [dim for i, dim in enumerate(in_dims) if i not in batchable]
        if any(dim is not None for dim in tensor_dims):
            _unsupported_vmap(what, in_dims)
        size = info.batch_size
        args = [_fold(arg, in_dims[i], size) if i in batchable else arg for i, arg in enumerate(args)]
        result = op(*args)
        if isinstance(result, torch.Tensor):
            return _unfold(result, size), 0
        outputs = tuple(t if t.numel() == 0 and t.ndim == 1 else _unfold(t, size) for t in result)
        return outputs, tuple(None if t.numel() == 0 and t.ndim == 1 else 0 for t in result)

    op.register_vmap(rule)


_register_vmap(fsq.quantize, (0,), "the level tables")
_register_vmap(fsq.quantize_backward, (0, 1), "the level tables")
_register_vmap(fsq.indices_to_codes, (0,), "the level tables")
_register_vmap(fsq_projected.quantize_projected, (0,), "the projection weights or the level tables")
_register_vmap(fsq_projected.indices_to_codes_projected, (0,), "the projection weights or the level tables")
