"""Block swap (``train.blocks_to_swap: N``): the last N denoiser blocks keep their frozen base weights on the
CPU and move them onto the compute device for each forward and each backward, for GPUs the whole base does
not fit on (FLUX.1 in bf16 on 24 GB). Design, memory arithmetic and costs: docs/block_swap.md.

What moves: the parameters a swapped block has when swapping starts, i.e. the frozen base (the arm's adapter
is attached later and never moves, so the optimizer only ever sees tensors on the device). While a block is
out, each of those parameters' ``.data`` is an empty placeholder on the device, so any use fails loudly, and
the values live in one host copy (pinned with CUDA); a move in makes a fresh device copy, a move out drops it.
No weight is ever written, so nothing is copied back.

When:
- forward pre-hook: in; forward hook: out, after hooking the block's outputs when they need gradients;
- backward: the hook on an output fires just before backward reaches the block: in, and it stays in (held)
  until the next swapped block's backward starts or the backward ends (an autograd engine callback). The
  engine runs nodes in reverse creation order, so when the next (earlier) block starts, this one is done;
- gradient checkpointing: the recomputation runs the forward hooks again inside the block's backward, while
  it is held: it stays in;
- saved tensors: without checkpointing a forward saves views of the weights for its backward (linear keeps
  W^T). A saved-tensor hook stores such a view as (parameter, geometry) and rebuilds it from the moved-in copy
  in backward, so a move out really frees the device copy.
At most one swapped block is on the device at a time (no prefetch): the transfer is not overlapped.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from fluxlora.config_errors import ConfigError, Problem
from fluxlora.layers import BLOCK_PREFIXES

FIELD = "train.blocks_to_swap"
OUT, IN, HOST = "out", "in", "host"  # a swapped block's weights: placeholders, device copies, the host copies


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The denoiser's repeated-block lists named by the family table (layers.BLOCK_PREFIXES: FLUX.1/.2
    transformer_blocks + single_transformer_blocks, SD3 and Qwen-Image transformer_blocks, Z-Image noise_refiner
    + context_refiner + layers) in the order the model registers them, which is their execution order."""
    names = {p.rstrip(".") for p in BLOCK_PREFIXES}
    return [m for n, m in model.named_children() if n in names and isinstance(m, nn.ModuleList)]


def swapped_blocks(model: nn.Module, n: int, source: str = "<config>") -> list[nn.Module]:
    """The last ``n`` blocks in execution order (docs/block_swap.md: the forward reaches them after the
    resident ones, the backward starts with them; FLUX's last blocks are its smaller single-stream ones)."""
    if n == 0:
        return []
    blocks = [b for lst in block_lists(model) for b in lst]
    if not blocks:
        raise ConfigError(source, [Problem(FIELD, str(n), f"the denoiser {type(model).__name__} has no block "
                                           "list to swap", "set train.blocks_to_swap: 0")])
    if n > len(blocks):
        raise ConfigError(source, [Problem(FIELD, str(n), f"the denoiser has {len(blocks)} blocks",
                                           f"use at most {len(blocks)}")])
    return blocks[len(blocks) - n:]


@dataclass(eq=False)
class _Block:
    module: nn.Module
    params: list[nn.Parameter]  # the frozen base weights that move
    host: list[torch.Tensor]  # their values, on the CPU
    home: list[torch.device]  # where each was when swapping started (restored there)
    state: str = OUT
    held: bool = False  # in for its backward (evicted by the next block's backward or the backward's end)
    handles: list = field(default_factory=list)
    ptrs: list[int] = field(default_factory=list)  # storage addresses of its device copies while in


@dataclass(frozen=True)
class _Saved:
    """A saved tensor that is a view of a swapped weight: rebuilt from the weight's data at unpack."""

    param: nn.Parameter
    size: tuple
    stride: tuple
    offset: int  # relative to the weight's own storage offset


def _check_movable(module: nn.Module) -> None:
    """bitsandbytes keeps int8 / nf4 quantization state outside the parameter data (Int8Params' SCB and the
    layer's CB/SCB after a forward, Params4bit.quant_state): a .data swap would leave it behind. The config
    refuses quantized bases with blocks_to_swap; this guards direct use."""
    bad = [n for n, p in module.named_parameters() if type(p).__module__.startswith("bitsandbytes")]
    if bad:
        raise ConfigError("<model>", [Problem(FIELD, None, f"{bad[0]} is a bitsandbytes quantized weight",
                                              "use model.quantize: none with block swap")])


class BlockSwap:
    """The hooks and placement of one swapping session (use `swapping`)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda" and torch.cuda.is_available()
        self.blocks: list[_Block] = []
        self.bytes_in = 0  # bytes moved onto the device so far (transfer accounting)
        self._by_ptr: dict[int, tuple[_Block, int]] = {}  # storage address of a device copy -> its weight
        self._paused, self._task = False, None

    def start(self, blocks: list[nn.Module]) -> None:
        """Offload ``blocks`` (their frozen weights to the host, placeholders in place) and hook them."""
        for module in blocks:
            _check_movable(module)
        for module in blocks:
            self._offload(module)

    # ----- placement -----------------------------------------------------------------------------------

    def _offload(self, module: nn.Module) -> None:
        # The frozen base: adapter tensors ("lora_" names: peft's and our layers', as adapters.adapter_state
        # reads them) never move, even when swapping starts after they exist.
        params = [p for n, p in module.named_parameters() if not p.requires_grad and "lora_" not in n]
        b = _Block(module, params, [], [p.device for p in params])
        self.blocks.append(b)  # before the copies: a failure part-way is still restored by close()
        for p in params:
            b.host.append(self._host_copy(p.data))
            p.data = self._placeholder(p)
        b.handles = [module.register_forward_pre_hook(self._pre_forward),
                     module.register_forward_hook(self._post_forward)]

    def _host_copy(self, data: torch.Tensor) -> torch.Tensor:
        if not self.pin:
            return data if data.device.type == "cpu" else data.to("cpu")
        host = torch.empty_strided(data.size(), data.stride(), dtype=data.dtype, pin_memory=True)
        return host.copy_(data)

    def _placeholder(self, p: torch.Tensor) -> torch.Tensor:
        return torch.empty(0, dtype=p.dtype, device=self.device)

    def _device_copy(self, h: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cpu":
            return h.to(self.device, non_blocking=self.pin, copy=True)
        if not h.is_contiguous():
            return h.clone()
        # A fresh CPU copy at the host's address modulo 64: CPU matmul kernels round differently for operands
        # aligned differently, and a swapped run must compute exactly what an unswapped one does.
        size = h.element_size()
        buf = torch.empty(h.numel() + 64 // size, dtype=h.dtype)
        shift = (h.data_ptr() - buf.data_ptr()) % 64 // size
        return buf[shift:shift + h.numel()].view(h.shape).copy_(h)

    def _place(self, b: _Block, state: str) -> None:
        """Put block ``b``'s weights OUT (placeholders), IN (fresh device copies) or on the HOST copies."""
        if b.state == state:
            return
        for ptr in b.ptrs:
            self._by_ptr.pop(ptr, None)
        b.ptrs = []
        for i, (p, h) in enumerate(zip(b.params, b.host)):
            if state == IN:
                p.data = self._device_copy(h)
                b.ptrs.append(p.data.untyped_storage().data_ptr())
                self._by_ptr[b.ptrs[-1]] = (b, i)
                self.bytes_in += h.numel() * h.element_size()
            else:
                p.data = h if state == HOST else self._placeholder(h)
        b.state, b.held = state, False

    def resident(self) -> list[nn.Module]:
        """The swapped blocks whose weights are on the device now."""
        return [b.module for b in self.blocks if b.state == IN]

    # ----- hooks ---------------------------------------------------------------------------------------

    def _block(self, module: nn.Module) -> _Block:
        return next(b for b in self.blocks if b.module is module)

    def _pre_forward(self, module, args) -> None:
        if self._paused:
            return
        if not _in_backward():  # not a recomputation: any earlier backward is over
            self._release_held()
        self._place(self._block(module), IN)

    def _post_forward(self, module, args, out) -> None:
        if self._paused:
            return
        b = self._block(module)
        if torch.is_grad_enabled():
            for t in _tensors(out):
                if t.requires_grad:
                    t.register_hook(lambda grad, b=b: self._before_backward(b))
        if not b.held:  # held: a checkpointing recomputation inside the block's own backward
            self._place(b, OUT)

    def _before_backward(self, b: _Block) -> None:
        """Backward is about to enter block ``b``: the previously held block is done; ``b`` comes in."""
        for other in self.blocks:
            if other.held and other is not b:
                self._place(other, OUT)
        self._place(b, IN)
        b.held = True
        task = torch._C._current_graph_task_id()  # as torch.utils.checkpoint reads it
        if task != self._task:  # once per backward: evict the last held block when it ends
            self._task = task
            torch.autograd.Variable._execution_engine.queue_callback(self._release_held)

    def _release_held(self) -> None:
        self._task = None
        for b in self.blocks:
            if b.held:
                self._place(b, OUT)

    def _pack(self, t: torch.Tensor):
        """Saved for backward: a view of a swapped weight's device copy is kept as its geometry only (so a
        move out frees the copy); anything else as a detached alias (no reference cycle through grad_fn)."""
        if t.layout == torch.strided and t.device.type == self.device.type and self._by_ptr:
            hit = self._by_ptr.get(t.untyped_storage().data_ptr())
            p = hit[0].params[hit[1]] if hit is not None else None
            if p is not None and t.dtype == p.dtype:
                offset = t.storage_offset() - p.data.storage_offset()
                return _Saved(p, tuple(t.size()), tuple(t.stride()), offset)
        return t.detach()

    @staticmethod
    def _unpack(saved):
        if isinstance(saved, _Saved):  # the block is in again: its backward moved it in
            data = saved.param.data
            return data.as_strided(saved.size, saved.stride, data.storage_offset() + saved.offset)
        return saved

    # ----- modes and the end ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def readable(self, on_device: bool = False):
        """Every swapped weight readable, hooks paused, for code that reads base weights directly (an init,
        the export): the host copies themselves (no device memory: such reads compute on the CPU), or with
        ``on_device`` device copies of them all (a data-driven init's pass runs the model: the memory of an
        unswapped run). Afterwards the blocks are out again and any tensor created in them meanwhile (the
        adapter: peft and our layers put it beside the base weight) is moved onto the device."""
        self._paused = True
        try:
            for b in self.blocks:
                self._place(b, IN if on_device else HOST)
            yield self
        finally:
            for b in self.blocks:
                self._place(b, OUT)
            self._adopt()
            self._paused = False

    def _adopt(self) -> None:
        for b in self.blocks:
            moving = {id(p) for p in b.params}
            for p in b.module.parameters():
                if id(p) not in moving and p.device != self.device:
                    p.data = p.data.to(self.device)

    def close(self) -> None:
        """Every weight back where it was, as it was; no hook left."""
        self._paused = True
        for b in self.blocks:
            for h in b.handles:
                h.remove()
            for p, h, home in zip(b.params, b.host, b.home):
                p.data = h.to(home)
            b.state, b.held = HOST, False
        self._by_ptr.clear()
        self.blocks = []


def _in_backward() -> bool:
    """Whether this thread runs inside a backward (where checkpointing recomputes a block's forward)."""
    return torch._C._current_graph_task_id() != -1


def _tensors(out) -> list[torch.Tensor]:
    """The tensors of a block's output (a tensor, or tuples / lists / dicts of them)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


@contextlib.contextmanager
def resident(model: nn.Module, n: int, device, source: str = "<config>"):
    """The denoiser runs on ``device`` inside the block, its last ``n`` blocks swapped through it (generation
    outside an arm: class images, the base's validation scores). Afterwards the swapped blocks' weights are
    back on the host, the rest stays on ``device``. ``n`` = 0: the whole model is moved there."""
    with swapping(model, n, device, source) as swap:
        model.to(device)
        yield swap


@contextlib.contextmanager
def swapping(model: nn.Module, n: int, device, source: str = "<config>"):
    """Swap the last ``n`` blocks of ``model`` (swapped_blocks) through ``device`` inside the block; yields the
    BlockSwap (``readable``, ``resident``, ``bytes_in``). On exit, normal or not, every weight is back where
    it was and no hook is left. ``n`` = 0: nothing happens."""
    swap = BlockSwap(device)
    try:
        swap.start(swapped_blocks(model, n, source))
        hooks = (torch.autograd.graph.saved_tensors_hooks(swap._pack, swap._unpack) if swap.blocks
                 else contextlib.nullcontext())
        with hooks:
            yield swap
    finally:
        swap.close()
