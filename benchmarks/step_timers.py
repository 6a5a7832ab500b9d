"""Timers for the parts of a training step, for the scaling study's breakdown.

    with StepTimers(chunks, optimizer) as timers:
        timers.reset()
        train_step(...)
        parts = timers.totals_s()   # seconds per part, this rank

How: every boundary of a part records a time point on the device's current stream (a CUDA
event; no host synchronization, so an instrumented step runs at nearly the speed of a plain
one) and the intervals are read once the step is over; on the CPU every operation is
synchronous and the host clock is read instead. An interval is thus the stream time from the
moment the device reached the part's first work to the moment it finished its last, idle gaps
of the device inside the part included. Collectives count where their waiting lands on the
compute stream (torch.distributed makes it wait for the communication stream).
  forward      Megatron's own `forward-compute` timer points (model forward + loss function of
               each micro-batch), through `TransformerConfig.timers`
  backward     Megatron's `backward-compute` timer points (autograd backward per micro-batch)
  pipeline_p2p Megatron's pipeline send/receive timer points (0 without pipelining)
  grad_sync    the schedule's `finalize_model_grads` call: data-parallel gradient
               reduce(-scatter), sequence-parallel norm all-reduce, token-count scaling
  fwd_bwd      the whole schedule (`forward-backward`); what the four above leave of it is
               schedule overhead
  optimizer    from `prepare_grads` to the end of `step_with_ready_grads` (grad norm,
               clipping, Adam, the distributed optimizer's parameter all-gather)
  moe_dispatch the token dispatcher's `token_dispatch` (all-to-all or all-gather of the routed
               tokens and their probabilities), forward AND backward
  moe_combine  the token dispatcher's `token_combine` (the return all-to-all or
               reduce-scatter), forward and backward
The MoE parts lie INSIDE forward + backward (they are not added to them). Their backward is
timed between identity autograd functions placed on the call's outputs (whose backward opens
the window) and inputs (whose backward closes it); the autograd engine could run other ready
work in between, but the nodes between are the collective's own backward. Permutation, the
routing-map metadata exchange (`dispatch_preprocess`) and expert compute are not in them.
"""

import time
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Tuple

import torch

P2P_WORDS = ("send", "recv")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Clock:
    """Time points: CUDA events on the current stream, or the host clock without CUDA."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()
        self.origin = None

    def now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def reset(self) -> None:
        self.origin = self.now()

    def seconds(self, mark) -> float:
        """Seconds from `reset()` to `mark`; call after `settle()`."""
        if not self.cuda:
            return mark - self.origin
        return self.origin.elapsed_time(mark) / 1e3

    def settle(self) -> None:
        synchronize()


class _Timer:
    """One named timer in Megatron's `Timers` interface (`start()` / `stop()`)."""

    def __init__(self, clock: Clock, spans: List[Tuple]):
        self.clock, self.spans, self.started = clock, spans, None

    def start(self, barrier: bool = False) -> None:
        self.started = self.clock.now()

    def stop(self, barrier: bool = False) -> None:
        if self.started is not None:
            self.spans.append((self.started, self.clock.now()))
            self.started = None


class _Window:
    """The backward of one dispatcher call: opened by the first output gradient to arrive,
    closed by the last input gradient."""

    def __init__(self, clock: Clock):
        self.clock, self.opens, self.closes = clock, [], []

    def open(self) -> None:
        self.opens.append(self.clock.now())

    def close(self) -> None:
        self.closes.append(self.clock.now())

    def seconds(self) -> float:
        if not self.opens or not self.closes:
            return 0.0
        first = min(self.clock.seconds(m) for m in self.opens)
        last = max(self.clock.seconds(m) for m in self.closes)
        return max(0.0, last - first)


class _Mark(torch.autograd.Function):
    """Identity; its backward calls `on_backward` before passing the gradient on."""

    @staticmethod
    def forward(ctx, x, on_backward):
        ctx.on_backward = on_backward
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.on_backward()
        return grad, None


def _mark(value, on_backward: Callable[[], None]):
    """`value` (a tensor or a tuple of them) with a mark on every tensor that needs grad."""
    if isinstance(value, torch.Tensor):
        return _Mark.apply(value, on_backward) if value.requires_grad else value
    if isinstance(value, tuple):
        return tuple(_mark(v, on_backward) for v in value)
    return value


class StepTimers:
    """Installs the timers on a model's chunks and optimizer (see the module docstring) while
    the context is open; restores everything on exit."""

    def __init__(self, chunks: List, optimizer):
        from megatron.core.utils import get_model_config

        self.config = get_model_config(chunks[0])
        self.optimizer = optimizer
        self.dispatchers = [m.token_dispatcher for c in chunks for m in c.modules()
                            if hasattr(m, "token_dispatcher")]
        self.clock = Clock()
        self.spans: Dict[str, List[Tuple]] = defaultdict(list)
        self.windows: Dict[str, List[_Window]] = defaultdict(list)
        self._open: Dict[str, _Timer] = {}
        self._saved: Optional[Tuple] = None

    def __enter__(self) -> "StepTimers":
        self._saved = (self.config.timers, self.config.finalize_model_grads_func)
        self.config.timers = self._timer
        self.config.finalize_model_grads_func = self._timed(
            "grad_sync", self.config.finalize_model_grads_func)
        self.optimizer.prepare_grads = self._starting("optimizer", self.optimizer.prepare_grads)
        self.optimizer.step_with_ready_grads = self._stopping(
            "optimizer", self.optimizer.step_with_ready_grads)
        for d in self.dispatchers:
            d.token_dispatch = self._dispatcher_call("moe_dispatch", d.token_dispatch)
            d.token_combine = self._dispatcher_call("moe_combine", d.token_combine)
        return self

    def __exit__(self, *exc) -> None:
        self.config.timers, self.config.finalize_model_grads_func = self._saved
        for name in ("prepare_grads", "step_with_ready_grads"):
            vars(self.optimizer).pop(name, None)  # the class's methods show through again
        for d in self.dispatchers:
            for name in ("token_dispatch", "token_combine"):
                vars(d).pop(name, None)

    def reset(self) -> None:
        """Start a new step: forget the previous one's time points."""
        self.spans.clear()
        self.windows.clear()
        self._open.clear()
        self.clock.reset()

    def totals_s(self) -> Dict[str, float]:
        """Seconds per part since `reset()` (names as in the module docstring)."""
        for timer in list(self._open.values()):  # e.g. an optimizer step that was skipped
            timer.stop()
        self.clock.settle()
        t = {name: sum(self.clock.seconds(b) - self.clock.seconds(a) for a, b in spans)
             for name, spans in self.spans.items()}
        parts = {"forward": t.get("forward-compute", 0.0),
                 "backward": t.get("backward-compute", 0.0),
                 "pipeline_p2p": sum(v for k, v in t.items() if any(w in k for w in P2P_WORDS)),
                 "grad_sync": t.get("grad_sync", 0.0), "fwd_bwd": t.get("forward-backward", 0.0),
                 "optimizer": t.get("optimizer", 0.0)}
        for name in ("moe_dispatch", "moe_combine"):
            parts[name] = t.get(name, 0.0) + sum(w.seconds() for w in self.windows[name])
        return parts

    # ------------------------------------------------------------------ wrappers
    def _timer(self, name: str, log_level: int = 0) -> _Timer:
        """What Megatron calls as `config.timers(name, log_level=...)`, then .start()/.stop()."""
        if name not in self._open:
            self._open[name] = _Timer(self.clock, self.spans[name])
        return self._open[name]

    def _timed(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            timer = self._timer(name)
            timer.start()
            try:
                return fn(*args, **kwargs)
            finally:
                timer.stop()
        return timed

    def _starting(self, name: str, fn: Callable) -> Callable:
        def starting(*args, **kwargs):
            self._timer(name).start()
            return fn(*args, **kwargs)
        return starting

    def _stopping(self, name: str, fn: Callable) -> Callable:
        def stopping(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            finally:
                self._timer(name).stop()
        return stopping

    def _dispatcher_call(self, name: str, fn: Callable) -> Callable:
        def call(*args, **kwargs):
            window = _Window(self.clock)
            self.windows[name].append(window)
            timer = self._timer(name)
            timer.start()
            out = fn(*tuple(_mark(a, window.close) for a in args), **kwargs)
            timer.stop()
            return _mark(out, window.open)
        return call
