"""A stand-in accelerator for CPU-only machines, so that "tensors stay on the compute device" can fail in CI.

`FakeAccelerator` is a TorchDispatchMode under which tensors can live on a device that is not the CPU: a tensor on
the fake device is a wrapper whose `.device` reads `fakegpu:0` (PyTorch's spare PrivateUse1 device type) and
whose data is an ordinary CPU tensor inside. Every aten op is run on the inner CPU tensors, and its results are
put back on the fake device when any input was there, or when the op was asked for that device (`.to(device)`,
`torch.zeros(..., device=device)`). So, exactly as on a GPU:
- `.to(device)` / `.cuda()`-like moves put data on the device; `.cpu()` / `.to("cpu")` take it off again (the
  result is a plain CPU tensor, which a container check sees);
- a tensor made without `device=` lands on the CPU;
- an op that mixes a device tensor with a non-scalar CPU tensor raises, as CUDA does ("expected all tensors to be
  on the same device"), except for the ops that CUDA lets mix (copies, and CPU indices into a device tensor).

Slow (every op goes through Python), meant for tiny models only.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map


def _register_fake_backend() -> torch.device:
    """PyTorch's PrivateUse1 slot, renamed "fakegpu" and given dummy hooks (once per process): a device type that
    no real code path knows, unlike "meta", which nn.Module treats as data-less."""
    from torch.utils import backend_registration as registration

    class BackendModule(registration._DummyBackendModule):
        def get_amp_supported_dtype(self):  # code may open `torch.autocast(device.type, enabled=False)` blocks
            return [torch.float16, torch.bfloat16]

    if registration._privateuse1_backend_name != "fakegpu":
        registration._setup_privateuseone_for_python_backend("fakegpu", backend_module=BackendModule())
    return torch.device("fakegpu", 0)


FAKE_DEVICE = _register_fake_backend()

# Ops that accept a device tensor together with non-scalar CPU tensors on CUDA too.
_MIXING_ALLOWED = {
    "aten::copy_", "aten::_to_copy", "aten::index.Tensor", "aten::index_put_", "aten::index_put",
    "aten::_index_put_impl_", "aten::lift_fresh", "aten::detach", "aten::alias", "aten::_local_scalar_dense",
    "aten::set_.source_Tensor", "aten::set_",
}


class OnDevice(torch.Tensor):
    """A tensor on the fake device: `.device` is FAKE_DEVICE, `.inner` holds the values on the CPU."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor, requires_grad: bool = False):
        # Sizes and strides are asked of `inner` each time (dispatch_sizes_strides_policy), so in-place metadata
        # changes (squeeze_, t_, ... which ATen's composite ops use) stay visible on the wrapper.
        out = torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, strides=inner.stride(), storage_offset=inner.storage_offset(), dtype=inner.dtype,
            layout=inner.layout, device=FAKE_DEVICE, requires_grad=requires_grad,
            dispatch_sizes_strides_policy="sizes")
        out.inner = inner
        return out

    def __repr__(self):
        return f"OnDevice({self.inner!r})"

    def tolist(self):  # allowed on CUDA tensors too (an implicit copy to the host)
        return self.inner.tolist()

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert a tensor on the compute device to numpy: call .cpu() first (as on CUDA)")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Reached when no FakeAccelerator mode is active (e.g. after the run): behave the same way.
        return _run(func, args, kwargs or {})


class MixedDeviceError(RuntimeError):
    pass


_METADATA = {"aten::sym_size": lambda t, *a: t.size(*a), "aten::sym_stride": lambda t, *a: t.stride(*a),
             "aten::sym_numel": lambda t: t.numel(), "aten::sym_storage_offset": lambda t: t.storage_offset(),
             "aten::size": lambda t, *a: t.size(*a), "aten::stride": lambda t, *a: t.stride(*a),
             "aten::dim": lambda t: t.dim(), "aten::is_contiguous": lambda t, *a: t.is_contiguous(*a)}


def _run(func, args, kwargs):
    name = func._schema.name + ("." + func._schema.overload_name if func._schema.overload_name else "")
    if func._schema.name in _METADATA and args and isinstance(args[0], OnDevice):
        return _METADATA[func._schema.name](args[0].inner, *args[1:])
    if func._schema.name == "aten::_has_compatible_shallow_copy_type":
        # nn.Module.to asks whether it may swap a parameter's data in place: never across devices (it would leave
        # a CPU-typed Parameter pointing at device data).
        return isinstance(args[0], OnDevice) == isinstance(args[1], OnDevice) and bool(func(
            *(a.inner if isinstance(a, OnDevice) else a for a in args)))
    on_device, cpu_operands = [], []

    def unwrap(x):
        if isinstance(x, OnDevice):
            on_device.append(x)
            return x.inner
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.device.type == "cpu":
            cpu_operands.append(x)
        return x

    asked = []  # devices the op is asked to produce its result on (positional or keyword)

    def retarget(x):
        if isinstance(x, torch.device):
            asked.append(x)
            return torch.device("cpu") if x.type == FAKE_DEVICE.type else x
        return x

    inner_args, inner_kwargs = tree_map(retarget, tree_map(unwrap, args)), tree_map(retarget, tree_map(unwrap, kwargs))
    to_device = any(d.type == FAKE_DEVICE.type for d in asked)
    leaves_device = bool(asked) and not to_device and func._schema.name in ("aten::_to_copy", "aten::to")
    if on_device and cpu_operands and func._schema.name not in _MIXING_ALLOWED and name not in _MIXING_ALLOWED:
        raise MixedDeviceError(f"{name}: a tensor on the compute device met a CPU tensor of shape "
                               f"{tuple(cpu_operands[0].shape)}; on a GPU this op raises 'Expected all tensors to be "
                               "on the same device'")
    out = func(*inner_args, **inner_kwargs)
    if leaves_device or not (on_device or to_device):
        return out
    # In-place ops return their first argument: hand back the same wrapper, not a new one.
    if func._schema.is_mutable and on_device and isinstance(out, torch.Tensor) and args and \
            isinstance(args[0], OnDevice) and out is args[0].inner:
        return args[0]

    def wrap(x):
        if not isinstance(x, torch.Tensor) or isinstance(x, OnDevice):
            return x
        # The wrapper is an inference tensor exactly when its data is (a view of a normal tensor taken under
        # inference mode is a normal tensor, as on any device).
        with torch.inference_mode(x.is_inference()):
            return OnDevice(x)

    return tree_map(wrap, out)


class _DeviceDispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


class _TensorConstructors(TorchFunctionMode):
    """torch.tensor / as_tensor / Tensor.new_tensor build their data below the dispatcher: build it on the CPU,
    then move it."""

    CONSTRUCTORS = (torch.tensor, torch.as_tensor, torch.asarray)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if func in self.CONSTRUCTORS and device is not None and torch.device(device).type == FAKE_DEVICE.type:
            return func(*args, **dict(kwargs, device="cpu")).to(FAKE_DEVICE)
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and isinstance(args[0], OnDevice):
            # Python lists and scalars in an index expression become tensors on the indexed tensor's device below
            # the dispatcher; give them as CPU tensors instead (CUDA accepts CPU indices and 0-dim CPU values).
            def as_index(i):
                if isinstance(i, list):
                    return torch.tensor(i)
                if isinstance(i, tuple):
                    return tuple(as_index(j) for j in i)
                return i

            args = (args[0], as_index(args[1])) + tuple(
                torch.tensor(v, dtype=args[0].dtype) if isinstance(v, (bool, int, float)) else v for v in args[2:])
            return func(*args, **kwargs)
        if func is torch.Tensor.new_tensor and isinstance(args[0], OnDevice) and device is None:
            data = torch.tensor(args[1], **{"dtype": args[0].dtype, **kwargs, "device": "cpu"})
            return data.to(FAKE_DEVICE)
        return func(*args, **kwargs)


class FakeAccelerator:
    """While active, `FAKE_DEVICE` behaves as an accelerator backed by the CPU (see the module docstring)."""

    def __enter__(self):
        self._modes = [_TensorConstructors(), _DeviceDispatch()]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        return False


def on_fake_device(t) -> bool:
    """True when `t` lives on the fake device."""
    return isinstance(t, OnDevice)
