"""A clear error for images too small for a backbone, found by a probe on the meta device.

A backbone given images smaller than its stem and pooling layers allow fails deep inside torch
("Kernel size can't be greater than actual input size", "Output size is too small"), which names
neither the backbone nor the setting to change. :func:`create_backbone` installs an
:class:`InputSizeCheck` forward pre-hook on every backbone: the first time the backbone meets an
input shape, it runs the backbone once on the ``meta`` device (shapes only: no arithmetic, no
memory, no change to parameters, buffers or random state). If that fails and a larger image
passes, it raises one ``ValueError`` naming the backbone, the size it got, the smallest size it
takes and the options to change. Any other failure is left to the real forward, which raises its
own error unchanged. :func:`check_input_size` runs the same check before any data is read.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["InputSizeCheck", "check_input_size"]

# Input shapes an architecture was probed with and that need no (further) check: (architecture
# key, channels, height, width, dtype). Shared between instances, since shapes depend on the
# architecture only (weights must match its shapes): a test suite or an evaluation that builds
# the same backbone many times pays for one probe. Holds only "passed" and "not a size problem",
# so a stale entry can only skip the check (the real forward then raises torch's own error).
_CHECKED: set[tuple[str, int, int, int, str]] = set()
# Probes stop here: an image this large that still fails is not failing for being too small.
_LARGEST_PROBE = 2048


def _meta_forward_error(
    module: nn.Module, shape: tuple[int, ...], dtype: torch.dtype
) -> Exception | None:
    """The error a forward of ``module`` raises for a zero input of ``shape``, or None.

    Run on the meta device (shape propagation only) through ``functional_call``, so the module's
    own tensors are neither read nor written. In eval mode: batch norm then neither needs more
    than one value per channel nor, as SyncBatchNorm, talks to other ranks; a size problem is a
    property of the layers' geometry, which modes do not change. Forward hooks are silenced, so
    that a caller's hook (collecting activations, say) never sees the probe; a module that needs
    its own hook to run (old-style weight norm) then fails the probe at every size, which reads
    as "not a size problem" and leaves the error to the real forward.
    """
    state = {
        name: torch.empty_like(tensor, device="meta")
        for name, tensor in (*module.named_parameters(), *module.named_buffers())
    }
    saved = [(m, m.training, m._forward_hooks, m._forward_pre_hooks) for m in module.modules()]
    for m, *_ in saved:
        m.training = False
        m._forward_hooks, m._forward_pre_hooks = OrderedDict(), OrderedDict()
    try:
        # A probe's warnings would repeat what the real forward says (or say nothing useful).
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            functional_call(module, state, (torch.zeros(shape, dtype=dtype, device="meta"),))
    except Exception as error:  # a diagnosis only: any failure is an answer
        return error
    finally:
        for m, training, hooks, pre_hooks in saved:  # each module's own mode and hooks
            m.training = training
            m._forward_hooks, m._forward_pre_hooks = hooks, pre_hooks
    return None


class InputSizeCheck:
    """Forward pre-hook: a ``ValueError`` naming the backbone when its input is too small.

    Costs a set lookup per forward; one meta-device probe per new input shape and architecture
    (tens of milliseconds). A class, not a closure, so that a deep copy of the backbone (a
    momentum encoder, a fine-tuned copy) and ``torch.save`` of the module carry it along.
    """

    def __init__(
        self,
        name: str,
        *,
        architecture: str | None,
        in_chans: int,
        small_stem: bool,
        small_stem_supported: bool,
    ) -> None:
        self.name = name
        # What create_backbone built it from; None: unknown, so probe results are not shared.
        self.architecture = architecture
        self.in_chans = in_chans
        self.small_stem = small_stem
        self.small_stem_supported = small_stem_supported

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if torch.compiler.is_compiling() or not args or not isinstance(args[0], torch.Tensor):
            return
        images = args[0]
        # The probe's own forward arrives here with a meta input; so may a caller's shape check.
        if images.ndim != 4 or images.device.type == "meta":
            return
        self.check(module, images.shape[1], images.shape[2], images.shape[3], images.dtype)

    def check(
        self, module: nn.Module, channels: int, height: int, width: int, dtype: torch.dtype
    ) -> None:
        """Raise ``ValueError`` if ``(channels, height, width)`` images are too small for ``module``."""
        key = (self.architecture or "", channels, height, width, str(dtype))
        if self.architecture is not None and key in _CHECKED:
            return
        error = _meta_forward_error(module, (1, channels, height, width), dtype)
        smallest = None
        if error is not None:
            smallest = self._smallest_size(
                module, channels, min(height, width), max(height, width), dtype
            )
        if smallest is None:  # passed, or fails at any size: not a size problem
            if self.architecture is not None:
                _CHECKED.add(key)
            return
        raise ValueError(self._message(height, width, smallest)) from error

    def _smallest_size(
        self, module: nn.Module, channels: int, failing: int, start: int, dtype: torch.dtype
    ) -> int | None:
        """The smallest square side the module takes, when it takes every larger side too.

        Doubles from ``start`` until a probe passes, then bisects down to ``failing`` (a side
        known, or for a non-square input taken, to fail): the answer passes and one less fails.
        None when no side up to ``_LARGEST_PROBE`` passes, or when a larger side (one more,
        about twice, about four times) fails again: the input then breaks another rule than a
        minimum size (a ViT's fixed size, MaxViT's 221–224 px, a side divisible by the patch
        size), whose own error says it better.
        """
        passing = max(start, 1) * 2
        while _meta_forward_error(module, (1, channels, passing, passing), dtype) is not None:
            if passing >= _LARGEST_PROBE:
                return None
            failing, passing = passing, min(passing * 2, _LARGEST_PROBE)
        while passing - failing > 1:
            middle = (failing + passing) // 2
            if _meta_forward_error(module, (1, channels, middle, middle), dtype) is None:
                passing = middle
            else:
                failing = middle
        # Both neighbours of the answer pass, and two odd sides well above it (no divisibility
        # rule passes them all by chance).
        for larger in (passing + 1, 2 * passing + 1, 4 * passing + 1):
            side = min(larger, _LARGEST_PROBE)
            if _meta_forward_error(module, (1, channels, side, side), dtype) is not None:
                return None
        return passing

    def _message(self, height: int, width: int, smallest: int) -> str:
        size = f"{height}×{width}" if height != width else f"{height} px"
        advice = (
            f"raise the image size to {smallest} or more (data.image_size={smallest} for `look "
            f"pretrain`, --image-size {smallest} for `look evaluate`)"
        )
        if self.small_stem_supported and not self.small_stem:
            # The CIFAR-style stem keeps 4× the resolution a standard ResNet stem leaves.
            advice += (
                ", or give it a small stem (model.small_stem=true for `look pretrain`, "
                "--small-stem for `look evaluate --timm`)"
            )
        # torch's own error is the __cause__ (shown with --debug); it names no setting.
        return (
            f"backbone {self.name!r} cannot take {size} images: they are too small for it (it "
            f"needs at least {smallest}×{smallest} px); {advice}"
        )


def _installed_check(backbone: nn.Module) -> InputSizeCheck | None:
    return next(
        (hook for hook in backbone._forward_pre_hooks.values() if isinstance(hook, InputSizeCheck)),
        None,
    )


def install_input_size_check(backbone: nn.Module, check: InputSizeCheck) -> None:
    """Register ``check`` as a forward pre-hook of ``backbone`` (replacing one installed before)."""
    for hook_id, hook in list(backbone._forward_pre_hooks.items()):
        if isinstance(hook, InputSizeCheck):
            del backbone._forward_pre_hooks[hook_id]
    backbone.register_forward_pre_hook(check)


def check_input_size(backbone: nn.Module, image_size: int, *, in_chans: int | None = None) -> None:
    """Raise ``ValueError`` now if ``image_size`` px images are too small for ``backbone``.

    The same check a backbone from :func:`look.models.create_backbone` runs at its first forward
    with a new input shape, for a caller that knows the image size before it reads any data.
    ``in_chans`` defaults to what the backbone was built for (else 3). Other failures of the
    probe are not raised here (the real forward will say what they are).
    """
    check = _installed_check(backbone) or InputSizeCheck(
        type(backbone).__name__,
        architecture=None,
        in_chans=3,
        small_stem=False,
        small_stem_supported=False,
    )
    dtype = next((p.dtype for p in backbone.parameters() if p.is_floating_point()), torch.float32)
    channels = check.in_chans if in_chans is None else in_chans
    check.check(backbone, channels, image_size, image_size, dtype)
