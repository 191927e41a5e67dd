"""The eager fast path: what a plain eager call skips, and that everything that traces still sees the ops.

The first GPU run (H200, torch 2.11, 2026-11-28, bench/results/2026-11-28-h200/) measured a tiny call at 372 us,
52x one elementwise launch: every eager launch went through ``wrap_triton``'s higher-order op. Eager launches now
call the kernel itself, and calls that record nothing for autograd skip the autograd.Function. These tests pin the
decisions (which object is launched, which path is taken) and that the fast path returns what the full one does.
"""

import contextlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from conftest import interpreting

from fsq_triton import FSQ
from fsq_triton.ops import autograd as ops_autograd
from fsq_triton.ops import fsq as ops_fsq


def kernel_stub():
    """Stands in for a JIT kernel; ``wrap_triton`` is replaced by a marker in these tests."""


@pytest.fixture
def compiled_mode(monkeypatch):
    """Launch decisions as on a GPU (no interpreter), with ``wrap_triton`` recording that it was asked."""
    monkeypatch.setattr(ops_fsq, "interpreting", lambda: False)
    monkeypatch.setattr(torch.library, "wrap_triton", lambda kernel: ("wrapped", kernel))


def test_plain_eager_launch_calls_the_kernel_itself(compiled_mode):
    assert ops_fsq._launch(kernel_stub, torch.empty(3)) is kernel_stub
    assert ops_fsq._launch(kernel_stub, torch.nn.Parameter(torch.empty(3))) is kernel_stub


@pytest.mark.parametrize("mode", ["fake", "flop_counter"])
def test_launch_under_a_dispatch_mode_goes_through_wrap_triton(compiled_mode, mode):
    """A tracer (fake tensors, make_fx, export) or any dispatch mode must see the kernel: ``wrap_triton``."""
    context = FakeTensorMode() if mode == "fake" else FlopCounterMode(display=False)
    with context:
        probe = torch.empty(3)
        assert ops_fsq._launch(kernel_stub, probe) == ("wrapped", kernel_stub)


def test_launch_of_a_fake_tensor_outside_its_mode_goes_through_wrap_triton(compiled_mode):
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.empty(3))
    assert ops_fsq._launch(kernel_stub, fake) == ("wrapped", kernel_stub)


def op(*args):
    """Stands in for a custom op in op_or_launcher's choice."""


def launcher(*args):
    """Stands in for a launcher in op_or_launcher's choice."""


@pytest.fixture
def runs_triton(monkeypatch):
    monkeypatch.setattr(ops_fsq, "_runs_triton", lambda t: True)


def test_op_or_launcher_picks_the_launcher_for_plain_tensors(runs_triton):
    x, w = torch.empty(2, 3), torch.nn.Parameter(torch.empty(3, 3))
    assert ops_autograd.op_or_launcher(op, launcher, x, w, None) is launcher


def test_op_or_launcher_picks_the_op_under_a_dispatch_mode(runs_triton):
    with FlopCounterMode(display=False):
        assert ops_autograd.op_or_launcher(op, launcher, torch.empty(2)) is op


def test_op_or_launcher_picks_the_op_for_tensor_subclasses_and_torch_func_wrappers(runs_triton):
    class Sub(torch.Tensor):
        pass

    assert ops_autograd.op_or_launcher(op, launcher, torch.empty(2).as_subclass(Sub)) is op
    seen = []

    def probe(x):
        seen.append(ops_autograd.op_or_launcher(op, launcher, x))
        return x

    torch.func.vmap(probe)(torch.empty(4, 2))
    assert seen == [op]


def test_needs_no_autograd():
    plain, leaf = torch.empty(2), torch.empty(2, requires_grad=True)
    assert ops_autograd._needs_no_autograd(plain, None)
    assert not ops_autograd._needs_no_autograd(plain, leaf)
    with torch.no_grad():
        assert ops_autograd._needs_no_autograd(leaf)
    with torch.inference_mode():
        assert ops_autograd._needs_no_autograd(leaf)
    with fwAD.dual_level(), torch.no_grad():  # forward-mode AD records even without grad mode
        assert not ops_autograd._needs_no_autograd(plain)


def needs_interpreter():
    if not interpreting():
        pytest.skip("runs the kernels on CPU tensors under the interpreter")


@pytest.mark.parametrize("kwargs, shape", [
    (dict(levels=[8, 5, 5, 5]), (2, 4, 3, 5)),
    (dict(levels=[8, 5, 5, 5], dim=12, num_codebooks=2), (2, 9, 12)),
], ids=["image", "projections"])
def test_calls_without_autograd_skip_the_function_and_match_it(kwargs, shape, monkeypatch):
    """Under no_grad (and on inputs that need no gradient) the module runs the launcher directly, with the same
    outputs and indices as the autograd.Function; a call that needs a gradient still goes through the Function."""
    needs_interpreter()
    torch.manual_seed(0)
    module = FSQ(**kwargs, backend="triton")
    x = torch.randn(*shape) * 2
    with_function = module(x.clone().requires_grad_(True))
    assert with_function[0].grad_fn is not None

    calls = []
    for name in ("FSQFunction", "FSQProjectedFunction"):
        cls = getattr(ops_autograd, name)
        monkeypatch.setattr(cls, "apply", classmethod(lambda c, *a: calls.append(c) or (_ for _ in ()).throw(AssertionError)))
    # with grad mode on, only a call whose inputs (the projections' weights too) need no gradient skips it
    contexts = [torch.no_grad()] + ([] if "dim" in kwargs else [contextlib.nullcontext()])
    for context in contexts:
        with context:
            out, indices = module(x)
        assert out.grad_fn is None and calls == []
        torch.testing.assert_close(out, with_function[0].detach(), rtol=0, atol=0)
        assert torch.equal(indices, with_function[1])
