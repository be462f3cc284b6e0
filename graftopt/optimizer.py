"""GraftOptimizer: any torch optimizer, plus a graft round after every ``every``-th step."""

from __future__ import annotations

import gc
import warnings
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .adapters import Adapter, Unit, get_adapter, unwrap
from .adapters.base import nonempty, validate_units
from .adapters.channels import channel_spaces
from .adapters.generic import GenericAdapter, warn_uncovered
from .diagnostics import RoundRecord, user_stacklevel
from .grafter import Grafter
from .peers import ModulePeers, PeerSource
from .recalibrate import Recalibration
from .rounds import Participant
from .settings import DEFAULTS, GraftSettings

__all__ = ["GraftOptimizer", "ring"]

# The settings a state dict keeps beside its "settings" entry.
_SAVED_OUTSIDE_SETTINGS = ("every", "start", "rate", "rate_by_lr", "optimizer_state", "align")
# 2: the inner optimizer's entries at the top level (1: under "optimizer").
_STATE_VERSION = 2
_D = DEFAULTS


def _live_modules() -> list[nn.Module]:
    """Every module alive in the process, from one pass over the garbage collector's objects."""
    kinds: dict[type, bool] = {}
    found = []
    for obj in gc.get_objects():
        # type(), not isinstance(): some objects (deprecated torch aliases) warn on __class__.
        kind = type(obj)
        is_module = kinds.get(kind)
        if is_module is None:
            is_module = kinds[kind] = issubclass(kind, nn.Module)
        if is_module:
            found.append(obj)
    return found


def _candidates(params: Sequence[Tensor]) -> list[nn.Module]:
    """Every live module whose ``parameters()`` are exactly ``params``, innermost first: the
    module holding the first parameter and those of its ancestors that match."""
    first = params[0]
    parents: dict[int, list[nn.Module]] = {}
    frontier = []
    for m in _live_modules():
        for child in m._modules.values():
            if child is not None:
                parents.setdefault(id(child), []).append(m)
        if any(t is first for t in m._parameters.values()):
            frontier.append(m)
    ids = [id(p) for p in params]
    found: list[nn.Module] = []
    seen: set[int] = set()
    while frontier:
        upper = []
        for m in frontier:
            if id(m) in seen:
                continue
            seen.add(id(m))
            own = [id(p) for p in m.parameters()]
            if own == ids:
                found.append(m)
            if len(own) <= len(ids):  # an ancestor of a larger module cannot match
                upper.extend(parents.get(id(m), ()))
        frontier = upper
    unique: dict[int, nn.Module] = {}
    for m in found:
        unique.setdefault(id(unwrap(m)), unwrap(m))
    return list(unique.values())


def _signature(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(p.shape)) for n, p in unwrap(model).named_parameters()]


def _describe_candidates(candidates: Sequence[nn.Module]) -> str:
    return ", ".join(
        f"{type(m).__name__} (first layer {next(iter(_signature(m)), ('?',))[0]!r})"
        for m in candidates
    )


def _infer_host(optimizer: Optimizer, peers: Sequence[nn.Module] | None) -> nn.Module:
    """The model the optimizer trains: its ``parameters()`` are exactly the optimizer's, in
    order, and (among several such models, a wrapper and the network inside it) its layers
    are the peers' layers; without peer modules, the outermost."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not params:
        raise ValueError("the optimizer holds no parameters")
    candidates = _candidates(params)
    if not candidates:
        raise ValueError(
            "cannot tell which model this optimizer trains: its parameters are not exactly one "
            "model's parameters in module order (parameter groups such as timm's weight-decay "
            "split reorder them); pass model=the_host_model to GraftOptimizer"
        )
    if len(candidates) == 1 or not peers:
        return candidates[-1]
    wanted = _signature(peers[0])
    matching = [m for m in candidates if _signature(m) == wanted]
    if matching:
        return matching[-1]
    raise ValueError(
        f"cannot tell which model this optimizer trains: the models holding exactly its "
        f"parameters are {_describe_candidates(candidates)}, and none has the layers of peer 0 "
        f"({type(unwrap(peers[0])).__name__}, first layer {wanted[0][0] if wanted else None!r}); "
        "pass model=the_host_model to GraftOptimizer"
    )


def _state_chain(optimizer: Optimizer) -> list[Any]:
    """The state of ``optimizer`` and of the optimizers it wraps (timm's Lookahead keeps
    its slow weights, and the momentum, in its base optimizer's state)."""
    chain, seen = [], set()
    current: Any = optimizer
    while isinstance(current, Optimizer) and id(current) not in seen:
        seen.add(id(current))
        chain.append(current.state)
        current = next(
            (getattr(current, n) for n in ("_base_optimizer", "base_optimizer", "optimizer")
             if isinstance(getattr(current, n, None), Optimizer)),
            None,
        )  # fmt: skip
    return chain


def _refuse_sharded(model: nn.Module, who: str) -> None:
    """Refuse a model whose parameters are DTensors (FSDP2's ``fully_shard``, tensor parallel):
    a round reads and writes whole tensors, which a shard is not."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            raise ValueError(
                f"{who} parameter {name!r} is a DTensor (FSDP2's fully_shard or tensor "
                "parallel): a graft round reads and writes whole tensors, and sharded ones are "
                "not supported. Graft unsharded models (DDP for data parallel: one peer's "
                "replicas, see docs/distributed.md)"
            )


def _warn_ddp_over_peers(model: nn.Module | None, source: PeerSource) -> None:
    """Warn when the host is DDP over the very ranks it grafts from: its peers are replicas."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel) or not hasattr(source, "group"):
        return
    import torch.distributed as dist

    ddp_ranks = set(dist.get_process_group_ranks(model.process_group))
    graft_group = source.group or dist.group.WORLD
    if ddp_ranks & set(dist.get_process_group_ranks(graft_group)) - {dist.get_rank()}:
        warnings.warn(
            "the host is DistributedDataParallel over ranks it also grafts from: DDP keeps "
            "those ranks identical, so every round blends a model with copies of itself and "
            "grafts nothing. Give DDP only this peer's data-parallel group "
            "(graftopt.distributed.peer_groups), or do not wrap it in DDP",
            RuntimeWarning,
            stacklevel=3,
        )


def _source_of(peers: Sequence[nn.Module] | PeerSource) -> PeerSource:
    if isinstance(peers, PeerSource):
        return peers
    if isinstance(peers, nn.Module):
        raise TypeError("peers must be a list of models (or a PeerSource), not one model")
    for i, peer in enumerate(peers):
        _refuse_sharded(unwrap(peer), f"peer {i}'s")
    return ModulePeers(list(peers))


def _host_of(
    optimizer: Optimizer, peers: Sequence[nn.Module] | PeerSource, model: nn.Module | None
) -> nn.Module:
    """The model the optimizer trains: ``model`` (checked), or the one inferred."""
    if model is None:
        host = _infer_host(optimizer, None if isinstance(peers, PeerSource) else list(peers))
    else:
        host = unwrap(model)
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not any(id(p) in held for p in host.parameters()):
            raise ValueError(
                f"model= is a {type(host).__name__} none of whose parameters this optimizer "
                "trains: pass the model whose parameters the optimizer was given"
            )
    _refuse_sharded(host, "the host's")
    return host


def _bound_units(host: nn.Module, adapter: Adapter, source: PeerSource, frozen: str) -> list[Unit]:
    """The host's units, checked, with the peers bound to them (``frozen="keep"``: the units
    whose scored weights all have ``requires_grad=False`` left out, after the peers' check)."""
    units = adapter.units(host)
    validate_units(host, units)
    units = nonempty(host, units)
    if type(adapter) is GenericAdapter:
        warn_uncovered(host, units)
    # Peers are checked against the whole architecture, frozen layers included.
    source.bind(host, units, adapter)
    if frozen == "keep":
        params = dict(host.named_parameters(remove_duplicate=False))
        units = [u for u in units if any(params[n].requires_grad for n in u.scored if n in params)]
        if not units:
            raise ValueError("frozen='keep' leaves no unit to graft: every layer is frozen")
    return units


class GraftOptimizer(Optimizer):
    r"""Wrap an optimizer so that its model grafts from its peers every ``every`` steps.

    After each ``every``-th call of :meth:`step`, each unit of the host (a conv or linear layer
    and the norm consuming it, as the adapter says) is blended with the same unit of each
    peer:

    .. math::
        W \leftarrow \frac1m \sum_j \big(\alpha_j W + (1-\alpha_j) W_j\big), \quad
        \alpha_j = \tfrac12 + \tfrac{A}{\pi}\arctan\big(c\,(H(W) - H(W_j))\big)

    with :math:`H` the entropy of the weights over ``bins`` equal-width bins. Everything else
    behaves as the inner optimizer: ``param_groups`` and ``state`` are the inner's own objects.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (SGD, AdamW, timm's, ...).
        peers: the models to graft from (``nn.Module``, possibly DDP- or compile-wrapped), or
            a :class:`~graftopt.peers.PeerSource`.
        every: steps between rounds (>= 1; default 10, the study's recipe: with peers that
            start from the host's weights, see docs/accuracy.md).
        model: the host model; inferred when the optimizer holds exactly one model's
            parameters in module order (``SGD(model.parameters())``).
        A: amplitude of the alpha curve, in [0, 1] (default 0.4: alpha in (0.3, 0.7)).
        c: steepness of the alpha curve, >= 0 (default 500).
        bins: histogram bins of the entropy (default 10).
        level: ``"layer"`` (one alpha per unit) or ``"filter"`` (one per output filter).
        criterion: ``"entropy"``, ``"l1"`` (mean absolute value) or ``"bn"`` (the norm scale,
            filter level).
        adapter: overrides the registry's adapter for the host's architecture.
        callback: called with each round's :class:`~graftopt.diagnostics.RoundRecord`.
        history: how many recent rounds :attr:`history` keeps (default 100; 0 keeps none).
        rate: each round moves the host this fraction of the way from its weights to the
            blend, in (0, 1] (default 1: the paper's round).
        rate_by_lr: scale ``rate`` by the learning rate's ratio to its initial value (the
            first parameter group's ``lr`` over its ``max_lr`` (OneCycleLR) or ``initial_lr``;
            a warning when the learning rate is above it), as population averaging
            does: rounds soften as the schedule decays.
        start: no round before this many steps (default 0); the first round comes at the
            first multiple of ``every`` at or after ``start``.
        optimizer_state: what a round does to the inner optimizer's state of the tensors it
            writes: ``"keep"`` (the paper) or ``"reset"`` (cleared, as for a fresh optimizer).
        recalibrate: a :class:`~graftopt.recalibrate.Recalibration`: after every round, the
            host's batch-norm statistics are reset and re-estimated from its batches.
        frozen: ``"blend"`` (default, as the paper blends every layer) or ``"keep"``: units
            whose scored weights have ``requires_grad=False`` when the wrapper is made (frozen
            layers) are left out of the rounds, with the norm that belongs to them.
        align: before every blend, put each peer's filters in the order that best matches
            the host's (weight matching over the channel spaces of
            :func:`graftopt.adapters.channels.channel_spaces`; the peer's function is
            unchanged). For peers that did not start from the same weights.
        route: the kernels rounds run on: ``"auto"`` (default: C on CPU once built, Triton on
            CUDA when installed, torch otherwise), or ``"c"``, ``"triton"``, ``"torch"`` (see
            :func:`graftopt.kernels.route`; refused where it cannot run).

    Example (peers that start from the host's weights, a round every 10 steps)::

        peers = [copy.deepcopy(model) for _ in range(2)]  # trained elsewhere, side by side
        inner = SGD(model.parameters(), lr=0.1, momentum=0.9)
        opt = GraftOptimizer(inner, peers=peers)
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    """

    def __init__(
        self,
        optimizer: Optimizer,
        peers: Sequence[nn.Module] | PeerSource,
        *,
        every: int = _D.every,
        model: nn.Module | None = None,
        A: float = _D.A,
        c: float = _D.c,
        bins: int = _D.bins,
        level: str = _D.level,
        criterion: str = _D.criterion,
        adapter: Adapter | None = None,
        callback: Callable[[RoundRecord], None] | None = None,
        history: int = 100,
        rate: float = _D.rate,
        rate_by_lr: bool = _D.rate_by_lr,
        start: int = _D.start,
        optimizer_state: str = _D.optimizer_state,
        recalibrate: Recalibration | None = None,
        frozen: str = _D.frozen,
        align: bool = _D.align,
        route: str = _D.route,
    ) -> None:
        # super().__init__ is not called on purpose: it would register the parameters a second
        # time. The wrapper shares the inner optimizer's param_groups, state and defaults.
        self._optimizer_step_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._patch_step_function()
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        settings = GraftSettings(
            every=every, A=A, c=c, bins=bins, level=level, criterion=criterion, rate=rate,
            rate_by_lr=rate_by_lr, start=start, optimizer_state=optimizer_state, frozen=frozen,
            align=align, route=route,
        )  # fmt: skip
        if isinstance(history, bool) or not isinstance(history, int) or history < 0:
            raise ValueError(f"history must be an integer >= 0, got {history!r}")
        if recalibrate is not None and not isinstance(recalibrate, Recalibration):
            raise TypeError(
                "recalibrate must be a graftopt.Recalibration(data, batches), got "
                f"{type(recalibrate).__name__}"
            )
        self.optimizer = optimizer
        self.rate = float(rate)
        self.rate_by_lr = rate_by_lr
        self.optimizer_state = optimizer_state
        self.recalibrate = recalibrate
        self.callback = callback
        self.history: deque[RoundRecord] = deque(maxlen=history)

        source = _source_of(peers)
        _warn_ddp_over_peers(model, source)
        host = self.model = _host_of(optimizer, peers, model)
        self.adapter = adapter if adapter is not None else get_adapter(host)
        units = _bound_units(host, self.adapter, source, frozen)
        # A weak reference, so that dropping the wrapper frees the host for another wrapper
        # without waiting for the garbage collector to break a cycle.
        grafter = Grafter(host, units, source, settings)
        if align:
            grafter.spaces = channel_spaces(host)
        record = weakref.WeakMethod(self._record)
        self._participant = Participant(grafter, every, lambda rec: record()(rec), start)
        group = optimizer.param_groups[0]
        self._initial_lr = float(group.get("initial_lr", group.get("lr", 1.0)))

    # -- delegation -------------------------------------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __getattr__(self, name: str) -> Any:
        # Reached only for names the wrapper lacks: the inner optimizer's own attributes
        # (timm's train.py reads ``is_second_order`` and calls ``sync_lookahead``).
        inner = self.__dict__.get("optimizer")
        if inner is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(inner, name)

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("GraftOptimizer cannot be pickled; save state_dict() instead")

    def __repr__(self) -> str:
        s = self.settings
        return (
            f"GraftOptimizer(every={self.every}, peers={self.peers.num_peers}, "
            f"A={s.A}, c={s.c}, bins={s.bins}, level={s.level!r}, criterion={s.criterion!r}, "
            f"rate={self.rate}{' x lr' if self.rate_by_lr else ''}, start={self.start}, "
            f"optimizer_state={self.optimizer_state!r}, align={self.align}, "
            f"adapter={self.adapter!r},\n  {self.optimizer!r})"
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    # -- grafting ---------------------------------------------------------------------------

    @property
    def settings(self) -> GraftSettings:
        return self._participant.grafter.settings

    @property
    def align(self) -> bool:
        """Whether each peer's filters are matched to the host's before a blend."""
        return self._participant.grafter.spaces is not None

    @property
    def peers(self) -> PeerSource:
        """Where the peers' weights come from."""
        return self._participant.grafter.peers

    @property
    def units(self) -> list[Unit]:
        """The host's units, as the adapter gave them."""
        return list(self._participant.grafter.units)

    @property
    def group(self) -> list[nn.Module]:
        """The models of this process whose rounds are simultaneous with this host's (this
        host, the models it grafts from that are hosts too, and those grafting from it),
        in the order they were wrapped. A round commits when all of them reached it."""
        return self._participant.group.hosts

    @property
    def steps(self) -> int:
        """Calls of :meth:`step` (one a GradScaler skips included)."""
        return self._participant.steps

    @property
    def rounds(self) -> int:
        """Graft rounds completed."""
        return self._participant.completed

    @property
    def every(self) -> int:
        """Steps between rounds; fixed at construction (the round schedule depends on it)."""
        return self._participant.every

    @every.setter
    def every(self, value: int) -> None:
        raise AttributeError(
            "GraftOptimizer.every is fixed at construction (rounds are counted from it); "
            "close() this wrapper and wrap the optimizer again with the new every"
        )

    @property
    def start(self) -> int:
        """Steps before the first round may come."""
        return self._participant.start

    def current_rate(self) -> float:
        """The rate the next round blends with (``rate``, times the lr ratio with
        ``rate_by_lr``)."""
        if not self.rate_by_lr:
            return self.rate
        group = self.optimizer.param_groups[0]
        lr = float(group["lr"])
        # OneCycleLR starts below its peak and keeps the peak as "max_lr".
        initial = float(group.get("max_lr", group.get("initial_lr", self._initial_lr)))
        if lr > initial * (1 + 1e-6) and not self.__dict__.get("_lr_warned"):
            self._lr_warned = True
            warnings.warn(
                f"rate_by_lr: the learning rate {lr:.4g} is above the one it scales from "
                f"({initial:.4g}, the param group's initial_lr): the schedule does not start at "
                "its peak (CyclicLR, a warm-up) and the rate stays at its cap until the "
                "learning rate falls below that; set the group's 'max_lr' to the peak",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
        scaled = self.rate * (lr / initial if initial > 0 else 1.0)
        # A rate of exactly 0 is no round; the floor keeps the round a (tiny) blend.
        return min(1.0, max(scaled, 1e-12))

    def _after_round(self, record: RoundRecord) -> None:
        """The host's own follow-up of a written round: optimizer state, norm statistics."""
        states = _state_chain(self.optimizer)
        for t in self._participant.grafter.live():
            for state in states:
                if t not in state:
                    continue
                if self.optimizer_state == "reset":
                    del state[t]
                elif "lookahead_slow_buff" in state[t]:
                    # timm's Lookahead would pull the weights back towards its slow copy
                    # and undo part of the round: the round is a sync point.
                    state[t]["lookahead_slow_buff"].copy_(t)
        if self.recalibrate is not None:
            self.recalibrate(self.model, record.round)

    def _record(self, record: RoundRecord) -> None:
        self._after_round(record)
        if self.history.maxlen:
            self.history.append(record)
        if self.callback is not None:
            self.callback(record)

    # A GradScaler hands the step to the wrapper with ``grad_scale`` and ``found_inf`` set,
    # instead of skipping the call on overflow: a skipped update still counts, so every peer
    # reaches its rounds at the same iteration whatever its scaler does.
    _step_supports_amp_scaling = True

    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        """Run the inner step; after every ``every``-th step, run a graft round.

        Called by a ``torch.amp.GradScaler``, a step whose gradients overflowed leaves the
        weights alone (as the scaler would) but counts: rounds come at the same iteration on
        every peer.
        """
        self._participant.before_step()
        found_inf = self.__dict__.get("found_inf")
        if found_inf is not None:
            loss = self._scaled_step(found_inf, self.__dict__.get("grad_scale"), closure)
        else:
            loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        self._participant.grafter.rate = self.current_rate()
        self._participant.after_step()
        return loss

    def _scaled_step(
        self, found_inf: Tensor, grad_scale: Tensor | None, closure: Callable[[], float] | None
    ) -> Any:
        """The inner step under a GradScaler: skipped on overflow, on unscaled gradients."""
        inner = self.optimizer
        args = () if closure is None else (closure,)
        if getattr(inner, "_step_supports_amp_scaling", False):
            # Fused optimizers unscale and skip inside their kernels.
            inner.grad_scale, inner.found_inf = grad_scale, found_inf  # type: ignore[attr-defined]
            try:
                return inner.step(*args)
            finally:
                del inner.grad_scale, inner.found_inf  # type: ignore[attr-defined]
        if bool(found_inf.item()):
            return None
        if grad_scale is not None:  # the scaler's unscale_ was not called: unscale here
            inverse = grad_scale.double().reciprocal().float()
            by_device: dict[torch.device, list[Tensor]] = {}
            for group in inner.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        by_device.setdefault(p.grad.device, []).append(p.grad)
            for device, grads in by_device.items():
                dense = [g for g in grads if not g.is_sparse]
                if dense:
                    torch._foreach_mul_(dense, inverse.to(device))
                for g in grads:
                    if g.is_sparse:
                        g.mul_(inverse.to(device))
        return inner.step(*args)

    def close(self) -> None:
        """Stop taking part in rounds so the host can be wrapped by another GraftOptimizer;
        from then on :meth:`step` is the inner optimizer's step alone."""
        self._participant.close()

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        p = self._participant
        s = self.settings
        # The inner optimizer's entries at the top level: a plain optimizer of the same kind
        # loads this state dict as it is (the "graft" entry is ignored there).
        return {
            **self.optimizer.state_dict(),
            "graft": {
                "version": _STATE_VERSION,
                "steps": p.steps,
                "arrived": p.arrived,
                "committed": p.committed,
                "dropped": p.dropped,
                "every": self.every,
                "start": p.start,
                "rate": self.rate,
                "rate_by_lr": self.rate_by_lr,
                "optimizer_state": self.optimizer_state,
                "align": self.align,
                "settings": {
                    "A": s.A,
                    "c": s.c,
                    "bins": s.bins,
                    "level": s.level,
                    "criterion": s.criterion,
                },
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the inner optimizer's state and the graft counters.

        A plain inner-optimizer state dict (no ``"graft"`` entry) loads into the inner optimizer
        with a warning, and the graft counters restart from step 0. Hooks registered with
        ``register_load_state_dict_pre_hook`` / ``_post_hook`` run as for any optimizer.
        """
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = pre_hook(self, state_dict) or state_dict
        self._load(state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _changed_settings(self, graft: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """The settings a saved ``"graft"`` entry holds with other values: (saved, current)."""
        mine = self.state_dict()["graft"]
        saved = {**graft.get("settings", {}), **graft}
        current = {**mine["settings"], **mine}
        names = [*mine["settings"], *_SAVED_OUTSIDE_SETTINGS]
        return {k: (saved[k], current[k]) for k in names if saved.get(k, current[k]) != current[k]}

    def _load(self, state_dict: dict[str, Any]) -> None:
        p = self._participant
        if "graft" not in state_dict:
            warnings.warn(
                "loading a state dict without graft state: the inner optimizer's state is loaded, "
                "graft counters restart at step 0",
                stacklevel=3,
            )
            self.optimizer.load_state_dict(state_dict)
            p.steps = p.arrived = p.committed = p.dropped = 0
            return
        graft = state_dict["graft"]
        changed = self._changed_settings(graft)
        if changed:
            warnings.warn(
                f"graft settings differ from the checkpoint's (saved, current): {changed}; "
                "the current settings are kept",
                stacklevel=3,
            )
        steps, arrived, committed = (int(graft[k]) for k in ("steps", "arrived", "committed"))
        # The counters are checked against the schedule they were saved under.
        every, start = int(graft.get("every", self.every)), int(graft.get("start", p.start))
        problems = _counter_problems(steps, arrived, committed, every, start)
        if problems:
            raise ValueError(
                f"the graft counters of this state dict contradict each other (steps={steps}, "
                f"arrived={arrived}, committed={committed}): {'; '.join(problems)}; it was not "
                "loaded"
            )
        if int(graft.get("version", 1)) < 2:
            inner = state_dict["optimizer"]
        else:
            inner = {k: v for k, v in state_dict.items() if k != "graft"}
        self.optimizer.load_state_dict(inner)
        p.steps, p.arrived, p.committed = steps, arrived, committed
        p.dropped = int(graft.get("dropped", 0))
        if (every, start) != (self.every, p.start):
            # Another schedule: its rounds so far are those due by now, all of them done.
            p.arrived = p.committed = steps // self.every if steps >= p.start else 0
            p.dropped = 0


def _counter_problems(
    steps: int, arrived: int, committed: int, every: int, start: int
) -> list[str]:
    """What contradicts itself in saved graft counters (saved under ``every`` and ``start``)."""
    due = steps // every if steps >= start else 0
    problems = []
    if min(steps, arrived, committed) < 0:
        problems.append("a counter is negative")
    if committed > arrived:
        problems.append(f"round {committed} committed but only round {arrived} reached")
    if arrived > due:
        problems.append(
            f"round {arrived} reached after {steps} steps (every={every}, start={start}: at most "
            f"round {due})"
        )
    if arrived < due and arrived != committed:
        problems.append(f"round {arrived} waits while round {due} is already due")
    return problems


def ring(
    models: Sequence[nn.Module],
    optimizers: Sequence[Optimizer],
    *,
    every: int = _D.every,
    same_init: bool = True,
    **kwargs: Any,
) -> list[GraftOptimizer]:
    """The paper's ring of k networks trained side by side: network i grafts from network i-1.

    The defaults are the recipe docs/accuracy.md found to pay: every network starts from the
    first one's weights and they graft every 10 steps. With the paper's alphas a full round
    (``rate=1``) at k = 2 leaves the two networks equal (each one's alpha against the other is
    one minus the other's): they train as one model. For k distinct networks (an ensemble,
    error bars) use k >= 3 or ``rate < 1``.

    Args:
        models: k >= 2 models of one architecture.
        optimizers: one optimizer per model, holding that model's parameters.
        every: steps between rounds (default 10).
        same_init: copy the first model's parameters and buffers into the others first
            (default); ``False`` keeps each model's own start, as the paper's code does (pair it
            with ``every`` of about an epoch and ``align=True``, see docs/accuracy.md).
        **kwargs: any other :class:`GraftOptimizer` keyword (``A``, ``c``, ``level``, ...).

    Step the models in lockstep (one step each per iteration); a round's result does not
    depend on their order within the iteration.
    """
    if len(models) != len(optimizers):
        raise ValueError(f"ring() got {len(models)} models but {len(optimizers)} optimizers")
    if len(models) < 2:
        raise ValueError(f"ring() needs at least 2 models, got {len(models)}")
    if same_init:
        start = unwrap(models[0]).state_dict()
        for i, m in enumerate(models[1:], 1):
            try:
                # In place: the optimizers keep the very tensors they were given.
                unwrap(m).load_state_dict(start)
            except RuntimeError as e:
                raise ValueError(
                    f"ring(same_init=True) cannot copy model 0's weights into model {i}: "
                    f"{str(e).splitlines()[0]} (models of one architecture are needed)"
                ) from None
    return [
        GraftOptimizer(opt, [models[i - 1]], every=every, model=models[i], **kwargs)
        for i, opt in enumerate(optimizers)
    ]
