"""GraftOptimizer: the round's math, delegation to the inner optimizer, checkpoints, errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import graftopt
from graftopt import GraftOptimizer

from .conftest import SMALLNET_UNITS, make_net, ref_alpha, ref_entropy, ref_graft


def _batch(seed: int, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _train_step(model, opt, seed):
    x, y = _batch(seed)
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _graft_once(host, peers, **kw):
    """Run exactly one round without an optimizer update (lr=0)."""
    opt = GraftOptimizer(
        torch.optim.SGD(host.parameters(), lr=0.0), peers, every=1, model=host, **kw
    )
    opt.step()
    return opt


# -- the math -----------------------------------------------------------------------------


@pytest.mark.parametrize("num_peers", [1, 3])
def test_layer_round_matches_reference(nets, num_peers):
    host, peers = nets[0], nets[1 : 1 + num_peers]
    expected = ref_graft(host, peers)
    _graft_once(host, peers)
    for name, value in host.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        torch.testing.assert_close(value.double(), expected[name], atol=2e-5, rtol=1e-5, msg=name)


def test_alpha_record_matches_reference(nets):
    host, peer = nets[0], nets[1]
    expected = {
        u: ref_alpha(
            ref_entropy(host.get_parameter(f"{u}.weight")),
            ref_entropy(peer.get_parameter(f"{u}.weight")),
        )
        for u in SMALLNET_UNITS
    }
    opt = _graft_once(host, [peer])
    rec = opt.history[-1]
    assert rec.round == 1 and rec.step == 1
    got = rec.unit_alphas()
    assert set(got) == set(SMALLNET_UNITS)
    for u, a in expected.items():
        assert got[u] == pytest.approx(a, abs=2e-5)
        assert 0.3 < got[u] < 0.7


def test_untouched_tensors_stay(nets):
    host = nets[0]
    before = host.bn1.num_batches_tracked.clone()
    _graft_once(host, [nets[1]])
    assert torch.equal(host.bn1.num_batches_tracked, before)


def test_identical_copy_changes_nothing(nets):
    host = nets[0]
    twin = copy.deepcopy(host)
    before = _state(host)
    _graft_once(host, [twin])
    for k, v in host.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-7, rtol=0)


def test_blend_lies_between_host_and_peer(nets):
    host, peer = nets[0], nets[1]
    h, p = _state(host), _state(peer)
    _graft_once(host, [peer])
    for k, v in host.state_dict().items():
        if v.is_floating_point():
            lo, hi = torch.minimum(h[k], p[k]), torch.maximum(h[k], p[k])
            assert torch.all(v >= lo - 1e-6) and torch.all(v <= hi + 1e-6), k


def test_swap_host_and_peer_gives_complementary_alphas(nets):
    a, b = copy.deepcopy(nets[0]), copy.deepcopy(nets[1])
    ra = _graft_once(a, [nets[1]]).history[-1].alphas
    rb = _graft_once(b, [nets[0]]).history[-1].alphas
    torch.testing.assert_close(ra + rb, torch.ones_like(ra), atol=1e-6, rtol=0)


def test_peers_are_never_written(nets):
    peers = nets[1:3]
    before = [_state(p) for p in peers]
    _graft_once(nets[0], peers)
    for p, b in zip(peers, before):
        for k, v in p.state_dict().items():
            assert torch.equal(v, b[k])


def test_filter_level_per_filter_alphas(nets):
    host, peer = nets[0], nets[1]
    h, p = _state(host), _state(peer)
    opt = _graft_once(host, [peer], level="filter")
    alphas = opt.history[-1].alpha("conv1")[0]
    assert alphas.shape == (6,)
    for j in range(6):
        a = ref_alpha(ref_entropy(h["conv1.weight"][j]), ref_entropy(p["conv1.weight"][j]))
        assert alphas[j].item() == pytest.approx(a, abs=2e-5)
        expected = a * h["bn1.running_mean"][j] + (1 - a) * p["bn1.running_mean"][j]
        assert host.bn1.running_mean[j].item() == pytest.approx(expected.item(), abs=1e-5)
        torch.testing.assert_close(
            host.conv1.weight[j],
            a * h["conv1.weight"][j] + (1 - a) * p["conv1.weight"][j],
            atol=1e-5,
            rtol=1e-5,
        )


def test_l1_criterion(nets):
    host, peer = nets[0], nets[1]
    h, p = _state(host), _state(peer)
    opt = _graft_once(host, [peer], criterion="l1")
    a = opt.history[-1].unit_alphas()["conv3"]
    expected = ref_alpha(
        h["conv3.weight"].abs().mean().item(), p["conv3.weight"].abs().mean().item()
    )
    assert a == pytest.approx(expected, abs=1e-5)


def test_bn_criterion(nets):
    host, peer = nets[0], nets[1]
    gh, gp = host.bn1.weight.detach().clone(), peer.bn1.weight.detach().clone()
    opt = _graft_once(host, [peer], level="filter", criterion="bn")
    torch.testing.assert_close(opt.history[-1].alpha("conv1")[0], gh.abs() / (gh.abs() + gp.abs()))


def test_frozen_parameters_are_blended(nets):
    host, peer = nets[0], nets[1]
    host.conv1.weight.requires_grad_(False)
    expected = ref_graft(host, [peer])
    _graft_once(host, [peer])
    torch.testing.assert_close(
        host.conv1.weight.double(), expected["conv1.weight"], atol=2e-5, rtol=1e-5
    )


def test_constant_tensor_scores_zero_without_nan(nets):
    host, peer = nets[0], nets[1]
    with torch.no_grad():
        host.conv3.weight.fill_(0.25)
    opt = _graft_once(host, [peer])
    assert opt.history[-1].host_scores[2].item() == 0.0
    assert all(torch.isfinite(v).all() for v in host.state_dict().values())


def test_non_finite_unit_is_skipped_with_a_warning(nets):
    host, peer = nets[0], nets[1]
    with torch.no_grad():
        peer.conv3.weight[0, 0, 0, 0] = float("nan")
        host.fc.bias[0] = float("inf")
    before = _state(host)
    with pytest.warns(RuntimeWarning, match=r"conv3.*fc|fc.*conv3"):
        opt = _graft_once(host, [peer])
    assert set(opt.history[-1].skipped) == {"conv3", "fc"}
    assert torch.equal(host.conv3.weight, before["conv3.weight"])
    assert torch.isfinite(host.conv3.weight).all()
    assert not torch.equal(host.conv1.weight, before["conv1.weight"])


@pytest.mark.parametrize("path", ["buffered", "in place"])
def test_exception_inside_round_leaves_host_untouched(nets, monkeypatch, path):
    host, peer = nets[0], nets[1]
    opt = GraftOptimizer(torch.optim.SGD(host.parameters(), lr=0.0), [peer], every=1)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    if path == "buffered":
        monkeypatch.setattr(graftopt.inplace.InPlaceRound, "possible", False)
        monkeypatch.setattr(graftopt.functional, "mix_many", boom)
    elif graftopt.kernels.route("cpu") == "c":
        monkeypatch.setattr(graftopt.kernels.cpu.GroupMix, "run", boom)
    else:
        pytest.skip("the in-place round needs the C kernels")
    before = _state(host)
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    for k, v in host.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_peer_of_other_dtype_is_handled(nets):
    host, peer = nets[0], copy.deepcopy(nets[1]).double()
    expected = ref_graft(host, [peer])
    _graft_once(host, [peer])
    assert host.conv1.weight.dtype == torch.float32
    torch.testing.assert_close(
        host.conv1.weight.double(), expected["conv1.weight"], atol=2e-5, rtol=1e-5
    )


def test_bf16_host_blends_in_own_dtype():
    host, peer = make_net(0).bfloat16(), make_net(1)
    _graft_once(host, [peer])
    assert host.conv1.weight.dtype == torch.bfloat16
    assert all(torch.isfinite(v.float()).all() for v in host.state_dict().values())


def test_channels_last_host_keeps_its_format():
    host, peer = make_net(0).to(memory_format=torch.channels_last), make_net(1)
    expected = ref_graft(host, [peer])
    _graft_once(host, [peer])
    assert host.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(
        host.conv1.weight.double(), expected["conv1.weight"], atol=2e-5, rtol=1e-5
    )


# -- rounds in time -------------------------------------------------------------------------


def test_rounds_come_every_n_steps(nets):
    host = nets[0]
    seen = []
    opt = GraftOptimizer(
        torch.optim.SGD(host.parameters(), lr=0.01), [nets[1]], every=3, callback=seen.append
    )
    for i in range(7):
        _train_step(host, opt, i)
    assert [r.step for r in seen] == [3, 6]
    assert opt.rounds == 2 and opt.steps == 7
    assert len(opt.history) == 2


def test_history_size_zero_keeps_nothing(nets):
    opt = GraftOptimizer(
        torch.optim.SGD(nets[0].parameters(), lr=0.0), [nets[1]], every=1, history=0
    )
    opt.step()
    assert len(opt.history) == 0 and opt.rounds == 1


def test_momentum_state_is_kept(nets):
    host = nets[0]
    opt = GraftOptimizer(
        torch.optim.SGD(host.parameters(), lr=0.01, momentum=0.9), [nets[1]], every=2
    )
    _train_step(host, opt, 0)
    buf = opt.state[host.conv1.weight]["momentum_buffer"].clone()
    _train_step(host, opt, 1)  # round after this step
    assert opt.rounds == 1
    assert not torch.equal(
        opt.state[host.conv1.weight]["momentum_buffer"], buf
    )  # updated by the step only
    assert "momentum_buffer" in opt.optimizer.state[host.conv1.weight]


def test_short_training_run_loss_falls():
    torch.manual_seed(0)
    models = [make_net(s) for s in range(2)]
    opts = graftopt.ring(
        models,
        [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models],
        every=5,
        same_init=False,
    )
    x, _ = _batch(123, n=64)
    score = x.mean((1, 2, 3))
    y = (score > score.quantile(1 / 3)).long() + (score > score.quantile(2 / 3)).long()  # learnable
    first = last = None
    for _ in range(60):
        losses = []
        for m, o in zip(models, opts):
            o.zero_grad()
            loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            o.step()
            losses.append(loss.item())
        first = first or sum(losses)
        last = sum(losses)
    assert opts[0].rounds == 12
    assert last < 0.8 * first


# -- delegation -----------------------------------------------------------------------------


def test_wrapper_shares_param_groups_and_state(nets):
    inner = torch.optim.SGD(nets[0].parameters(), lr=0.1, momentum=0.9)
    opt = GraftOptimizer(inner, [nets[1]], every=10)
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state
    assert opt.defaults is inner.defaults
    extra = nn.Parameter(torch.zeros(2))
    opt.add_param_group({"params": [extra]})
    assert inner.param_groups[-1]["params"][0] is extra
    nets[0].fc.weight.grad = torch.ones_like(nets[0].fc.weight)
    opt.zero_grad()
    assert nets[0].fc.weight.grad is None
    assert "GraftOptimizer" in repr(opt) and "SGD" in repr(opt)


def test_step_returns_closure_loss(nets):
    host = nets[0]
    opt = GraftOptimizer(torch.optim.SGD(host.parameters(), lr=0.01), [nets[1]], every=1)
    x, y = _batch(0)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(host(x), y)
        loss.backward()
        return loss

    assert isinstance(opt.step(closure), torch.Tensor)
    assert opt.rounds == 1


@pytest.mark.parametrize(
    "make_inner",
    [
        lambda p: torch.optim.AdamW(p, lr=1e-3),
        lambda p: torch.optim.RMSprop(p, lr=1e-3),
    ],
)
def test_any_torch_optimizer(nets, make_inner):
    opt = GraftOptimizer(make_inner(nets[0].parameters()), [nets[1]], every=2)
    for i in range(4):
        _train_step(nets[0], opt, i)
    assert opt.rounds == 2


def test_timm_optimizer_and_scheduler(nets):
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    host = nets[0]
    inner = create_optimizer_v2(host, opt="lamb", lr=0.01, weight_decay=0.05)
    with pytest.raises(ValueError, match="model="):
        GraftOptimizer(inner, [nets[1]], every=2)  # weight-decay groups reorder the parameters
    opt = GraftOptimizer(inner, [nets[1]], every=2, model=host)
    sched, _ = create_scheduler_v2(opt, sched="cosine", num_epochs=4, warmup_epochs=0)
    for epoch in range(3):
        _train_step(host, opt, epoch)
        sched.step(epoch + 1)
    assert inner.param_groups[0]["lr"] < 0.01
    assert opt.rounds == 1


def test_torch_scheduler_changes_inner_lr(nets):
    inner = torch.optim.SGD(nets[0].parameters(), lr=0.1)
    opt = GraftOptimizer(inner, [nets[1]], every=1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train_step(nets[0], opt, 0)
    sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.05)


def test_step_hooks_run(nets):
    opt = GraftOptimizer(torch.optim.SGD(nets[0].parameters(), lr=0.01), [nets[1]], every=1)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o)))
    opt.register_step_post_hook(lambda o, a, k: calls.append(("post", o)))
    _train_step(nets[0], opt, 0)
    assert calls == [("pre", opt), ("post", opt)]


# -- host inference and wrappers -----------------------------------------------------------


def test_host_is_inferred(nets):
    opt = GraftOptimizer(torch.optim.SGD(nets[0].parameters(), lr=0.1), [nets[1]], every=1)
    assert opt.model is nets[0]


def test_compiled_and_ddp_wrappers_are_unwrapped(nets):
    import torch.distributed as dist

    compiled_peer = torch.compile(nets[1])
    opt = GraftOptimizer(torch.optim.SGD(nets[0].parameters(), lr=0.0), [compiled_peer], every=1)
    expected = ref_graft(nets[0], [nets[1]])
    opt.step()
    torch.testing.assert_close(
        nets[0].fc.weight.double(), expected["fc.weight"], atol=2e-5, rtol=1e-5
    )
    opt.close()

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(nets[2])
        opt = GraftOptimizer(torch.optim.SGD(ddp.parameters(), lr=0.0), [nets[3]], every=1)
        assert opt.model is nets[2]
        assert opt.units[0].name == "conv1"
    finally:
        dist.destroy_process_group()


# -- checkpoints ----------------------------------------------------------------------------


def _ring_run(stop_at: int | None, total: int = 9):
    models = [make_net(s) for s in range(2)]
    make = lambda ms: [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in ms]  # noqa: E731
    opts = graftopt.ring(models, make(models), same_init=False, every=2)
    for i in range(total if stop_at is None else stop_at):
        for m, o in zip(models, opts):
            _train_step(m, o, i)
    if stop_at is None:
        return models
    saved = copy.deepcopy(
        {"models": [m.state_dict() for m in models], "opts": [o.state_dict() for o in opts]}
    )
    for o in opts:
        o.close()
    fresh = [make_net(10 + s) for s in range(2)]
    for m, sd in zip(fresh, saved["models"]):
        m.load_state_dict(sd)
    opts = graftopt.ring(fresh, make(fresh), same_init=False, every=2)
    for o, sd in zip(opts, saved["opts"]):
        o.load_state_dict(sd)
    for i in range(stop_at, total):
        for m, o in zip(fresh, opts):
            _train_step(m, o, i)
    return fresh


@pytest.mark.parametrize("stop_at", [1, 2, 5])
def test_resume_is_bit_identical(stop_at):
    unbroken = _ring_run(None)
    resumed = _ring_run(stop_at)
    for a, b in zip(unbroken, resumed):
        for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(v, w), k


def test_state_dict_contents_and_foreign_load(nets):
    opt = GraftOptimizer(torch.optim.SGD(nets[0].parameters(), lr=0.1), [nets[1]], every=3, A=0.2)
    for i in range(4):
        _train_step(nets[0], opt, i)
    sd = opt.state_dict()
    assert sd["graft"]["steps"] == 4 and sd["graft"]["committed"] == 1
    assert sd["graft"]["settings"]["A"] == 0.2
    with pytest.warns(UserWarning, match="without graft state"):
        opt.load_state_dict(opt.optimizer.state_dict())
    assert opt.steps == 0
    other = GraftOptimizer(torch.optim.SGD(nets[2].parameters(), lr=0.1), [nets[3]], every=3, A=0.4)
    with pytest.warns(UserWarning, match="differ"):
        other.load_state_dict(sd)
    assert other.steps == 4 and other.rounds == 1


def test_state_dict_loads_into_a_plain_optimizer(nets):
    """The inner optimizer's entries sit at the top level: a plain optimizer takes the state
    dict as it is; the layout of graft state version 1 still loads."""
    make = lambda: torch.optim.SGD(nets[0].parameters(), lr=0.1, momentum=0.9)  # noqa: E731
    opt = GraftOptimizer(make(), [nets[1]], every=3)
    for i in range(4):
        _train_step(nets[0], opt, i)
    sd = opt.state_dict()
    plain = make()
    plain.load_state_dict(sd)
    inner = opt.optimizer.state_dict()
    assert plain.state_dict()["param_groups"] == inner["param_groups"]
    for i, state in inner["state"].items():
        assert torch.equal(
            plain.state_dict()["state"][i]["momentum_buffer"], state["momentum_buffer"]
        )
    old = {"optimizer": inner, "graft": {**sd["graft"], "version": 1}}
    opt.load_state_dict(old)
    assert opt.steps == 4 and opt.rounds == 1


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every": 0}, "every"),
        ({"every": 1.5}, "every"),
        ({"every": 1, "bins": 1}, "bins"),
        ({"every": 1, "A": 1.5}, "A must"),
        ({"every": 1, "A": -0.1}, "A must"),
        ({"every": 1, "c": -1.0}, "c must"),
        ({"every": 1, "level": "block"}, "level"),
        ({"every": 1, "criterion": "norm"}, "criterion"),
        ({"every": 1, "criterion": "bn"}, "level='filter'"),
    ],
)
def test_bad_settings(nets, kwargs, match):
    with pytest.raises(ValueError, match=match):
        GraftOptimizer(torch.optim.SGD(nets[0].parameters(), lr=0.1), [nets[1]], **kwargs)


def test_bad_peers(nets):
    sgd = lambda: torch.optim.SGD(nets[0].parameters(), lr=0.1)  # noqa: E731
    with pytest.raises(ValueError, match="empty"):
        GraftOptimizer(sgd(), [], every=1)
    with pytest.raises(ValueError, match="host model itself"):
        GraftOptimizer(sgd(), [nets[1], nets[0]], every=1)
    with pytest.raises(TypeError, match="list of models"):
        GraftOptimizer(sgd(), nets[1], every=1)
    wide = make_net(5, classes=4)
    with pytest.raises(ValueError, match=r"peer 1 .*'fc.weight'.*\(3, 8\).*\(4, 8\)"):
        GraftOptimizer(sgd(), [nets[1], wide], every=1)
    other = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="peer 0"):
        GraftOptimizer(sgd(), [other], every=1)
    with pytest.raises(TypeError, match="Optimizer"):
        GraftOptimizer("sgd", [nets[1]], every=1)


def test_model_wrapped_twice_is_refused(nets):
    keep = GraftOptimizer(torch.optim.SGD(nets[0].parameters(), lr=0.1), [nets[1]], every=1)
    with pytest.raises(ValueError, match=r"already the host.*close\(\) on the other wrapper first"):
        GraftOptimizer(torch.optim.SGD(nets[0].parameters(), lr=0.1), [nets[2]], every=1)
    del keep
    GraftOptimizer(torch.optim.SGD(nets[0].parameters(), lr=0.1), [nets[2]], every=1)


def test_warnings_are_quiet_in_a_normal_run(nets):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = GraftOptimizer(torch.optim.SGD(nets[0].parameters(), lr=0.01), [nets[1]], every=1)
        _train_step(nets[0], opt, 0)


def test_inferred_host_is_the_outermost_model():
    def wrapped(seed):
        outer = nn.Module()
        outer.body = make_net(seed)
        outer.forward = outer.body.forward
        return outer

    host, peer = wrapped(0), wrapped(1)
    opt = GraftOptimizer(torch.optim.SGD(host.parameters(), lr=0.0), [peer], every=1)
    assert opt.model is host
    assert opt.units[0].name == "body.conv1"


class _Normalize(nn.Module):
    def forward(self, x):
        return x - x.mean()


def test_inferred_host_is_the_model_with_the_peers_layers():
    host, peer = make_net(0), make_net(1)
    around = nn.Sequential(_Normalize(), host)  # holds exactly the host's parameters too
    opt = GraftOptimizer(torch.optim.SGD(host.parameters(), lr=0.0), [peer], every=1)
    assert opt.model is host and opt.units[0].name == "conv1"
    del around


def test_host_inference_names_the_candidates_when_none_matches_the_peers():
    host = make_net(0)
    around = nn.Sequential(_Normalize(), host)
    peer = nn.Sequential(nn.Identity(), nn.Identity(), make_net(1))  # layers named '2.*'
    with pytest.raises(ValueError, match=r"SmallNet \(first layer 'conv1.weight'\)") as err:
        GraftOptimizer(torch.optim.SGD(host.parameters(), lr=0.0), [peer], every=1)
    assert "Sequential (first layer '1.conv1.weight')" in str(err.value)
    assert "peer 0 (Sequential, first layer '2.conv1.weight')" in str(err.value)
    del around


def test_round_follows_tensors_replaced_after_wrapping(nets):
    host, peer = nets[0], nets[1]
    opt = GraftOptimizer(torch.optim.SGD(host.parameters(), lr=0.0), [peer], every=1)
    host.double()  # replaces the BatchNorm buffers with new tensors
    expected = ref_graft(host, [peer])
    opt.step()
    torch.testing.assert_close(
        host.bn1.running_mean, expected["bn1.running_mean"], atol=2e-5, rtol=0
    )
    assert host.bn1.running_mean.dtype == torch.float64


def test_functional_graft_equals_one_round(nets):
    host, peers = nets[0], nets[1:3]
    before = [_state(p) for p in peers]
    expected = ref_graft(host, peers)
    record = graftopt.graft_(host, peers)
    for name, value in host.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            torch.testing.assert_close(value.double(), expected[name], atol=2e-5, rtol=1e-5)
    assert record.units == tuple(SMALLNET_UNITS) and record.alphas.shape == (2, 4)
    for p, b in zip(peers, before):
        assert all(torch.equal(v, b[k]) for k, v in p.state_dict().items())
    with torch.no_grad():
        peers[0].fc.bias[0] = float("nan")
    with pytest.warns(RuntimeWarning, match="fc"):
        assert graftopt.graft_(host, peers, level="filter").skipped == ("fc",)
    with pytest.raises(ValueError, match="peer 0"):
        graftopt.graft_(host, [make_net(0, classes=5)])


@pytest.mark.parametrize("bad", ["expanded", "inference"])
def test_tensors_a_round_cannot_write_are_refused_before_any_write(bad):
    host, peer = make_net(0), make_net(1)
    if bad == "expanded":
        host.fc.bias.data = torch.tensor([0.5]).expand(3)
    else:
        with torch.inference_mode():
            host.conv3.bias.data = torch.zeros(8)
    before = {k: v.clone() for k, v in host.state_dict().items()}
    with pytest.raises(ValueError, match=r"fc\.bias|conv3\.bias"):
        graftopt.graft_(host, [peer])
    for k, v in host.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("which", ["host", "peer"])
def test_a_replaced_submodule_raises_and_rewrapping_works(which):
    host, peer = make_net(0), make_net(1)
    opt = GraftOptimizer(torch.optim.SGD(host.parameters(), lr=0.0), [peer], every=1)
    opt.step()
    torch.manual_seed(7)
    (host if which == "host" else peer).fc = nn.Linear(8, 3)  # model surgery
    before = {k: v.clone() for k, v in host.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"\.fc was replaced .* wrap the model again"):
        opt.step()
    for k, v in host.state_dict().items():
        assert torch.equal(v, before[k]), k
    opt.close()
    again = GraftOptimizer(torch.optim.SGD(host.parameters(), lr=0.0), [peer], every=1)
    expected = ref_graft(host, [peer])
    again.step()
    torch.testing.assert_close(host.fc.weight.double(), expected["fc.weight"], atol=2e-6, rtol=1e-6)


# -- loss scaling -------------------------------------------------------------------------


def _scaled_ring_run(overflow_at: dict[int, int], *, clip: bool = False, fused: bool = False):
    """Two networks in a ring stepped through CPU GradScalers; peer p's gradients overflow
    at the iterations ``overflow_at`` maps to it."""
    models = [make_net(0), make_net(1)]
    inners = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, fused=fused) for m in models]
    seen: list[list[int]] = [[], []]
    opts = graftopt.ring(models, inners, same_init=False, every=3)
    for p, opt in enumerate(opts):
        opt.callback = lambda r, p=p: seen[p].append(r.step)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in models]
    for it in range(7):
        x, y = _batch(it)
        for p, (model, opt, scaler) in enumerate(zip(models, opts, scalers, strict=True)):
            opt.zero_grad()
            scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
            if overflow_at.get(p) == it:
                next(model.parameters()).grad.view(-1)[0] = float("inf")
            if clip:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
    return models, opts, seen, scalers


@pytest.mark.parametrize("clip", [False, True], ids=["scaled", "unscaled"])
def test_grad_scaler_without_overflow_trains_as_without_scaler(clip):
    models, _, seen, _ = _scaled_ring_run({}, clip=clip)
    ref_models = [make_net(0), make_net(1)]
    ref_inners = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in ref_models]
    ref_opts = graftopt.ring(ref_models, ref_inners, same_init=False, every=3)
    for it in range(7):
        for model, opt in zip(ref_models, ref_opts, strict=True):
            _train_step(model, opt, it)
    assert seen == [[3, 6], [3, 6]]
    for got, ref in zip(models, ref_models, strict=True):
        for (name, a), b in zip(got.state_dict().items(), ref.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_skipped_scaler_step_keeps_the_round_schedule(fused):
    # Peer 1 overflows at iteration 2, the step before round 1: its update is skipped, its
    # scaler backs off, and both peers still graft at the same iterations.
    models, opts, seen, scalers = _scaled_ring_run({1: 2}, fused=fused)
    assert seen == [[3, 6], [3, 6]]
    assert [o.steps for o in opts] == [7, 7] and [o.rounds for o in opts] == [2, 2]
    assert scalers[1].get_scale() < scalers[0].get_scale()
    assert all(torch.isfinite(t).all() for m in models for t in m.state_dict().values())


def test_skipped_scaler_step_leaves_the_weights():
    model = make_net(0)
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = GraftOptimizer(inner, [make_net(1)], every=5)
    scaler = torch.amp.GradScaler("cpu")
    before = _state(model)
    x, y = _batch(0)
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    next(model.parameters()).grad.view(-1)[0] = float("nan")
    scaler.step(opt)
    scaler.update()
    assert opt.steps == 1 and not opt.state
    for k, v in model.named_parameters():
        assert torch.equal(v, before[k]), k
    assert "found_inf" not in vars(opt) and "grad_scale" not in vars(opt)


def test_load_state_dict_hooks_run(nets):
    opt = GraftOptimizer(torch.optim.SGD(nets[0].parameters(), lr=0.1), [nets[1]], every=2)
    calls = []
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append(("pre", o)))
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("post", o)))
    opt.load_state_dict(opt.state_dict())
    assert calls == [("pre", opt), ("post", opt)]


# -- defaults: the study's recipe -----------------------------------------------------------


def test_ring_defaults_are_one_start_and_rounds_every_10() -> None:
    models = [make_net(i) for i in range(3)]
    opts = graftopt.ring(models, [torch.optim.SGD(m.parameters(), lr=0.1) for m in models])
    for m in models[1:]:
        for (name, a), b in zip(models[0].state_dict().items(), m.state_dict().values()):
            assert torch.equal(a, b), name
    assert all(o.every == 10 for o in opts)
    # The optimizers still hold the models' own tensors: the copy was in place.
    for m, o in zip(models, opts, strict=True):
        assert o.param_groups[0]["params"][0] is next(m.parameters())
    for i in range(10):
        for j, (m, o) in enumerate(zip(models, opts, strict=True)):
            _train_step(m, o, seed=100 * j + i)
    assert [o.rounds for o in opts] == [1, 1, 1]
    host = make_net(0)
    assert GraftOptimizer(torch.optim.SGD(host.parameters(), lr=0.1), [make_net(1)]).every == 10


def test_ring_same_init_names_the_model_that_does_not_fit() -> None:
    models = [make_net(0), make_net(1), nn.Sequential(nn.Linear(2, 2))]
    with pytest.raises(ValueError, match="into model 2"):
        graftopt.ring(models, [torch.optim.SGD(m.parameters(), lr=0.1) for m in models])


@pytest.mark.parametrize("state", ["keep", "reset"])
def test_lookahead_keeps_the_round(state: str) -> None:
    """timm's Lookahead would pull the weights back towards its pre-round slow copy."""
    from timm.optim import Lookahead

    models = [make_net(0), make_net(1)]
    inners = [Lookahead(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), k=2) for m in models]
    opts = graftopt.ring(models, inners, every=3, same_init=False, optimizer_state=state)
    for i in range(3):  # a Lookahead sync at step 2, the round at step 3
        for j, (m, o) in enumerate(zip(models, opts, strict=True)):
            _train_step(m, o, seed=10 * j + i)
    assert opts[0].rounds == 1
    # The pair is equal after a full round at K = 2 (to rounding) ...
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b)
    after = [_state(m) for m in models]
    for m, inner in zip(models, inners, strict=True):
        base = inner._base_optimizer.state
        for p in m.parameters():
            if state == "keep":
                assert torch.equal(base[p]["lookahead_slow_buff"], p)
            else:
                assert p not in base
    # ... and a Lookahead sync right after (no gradient step between) does not move it back.
    for inner in inners:
        inner.sync_lookahead()
    for m, state_after in zip(models, after, strict=True):
        for name, value in m.state_dict().items():
            assert torch.equal(value, state_after[name]), name


def test_a_closed_wrapper_makes_no_more_rounds() -> None:
    models = [make_net(0), make_net(1)]
    opts = graftopt.ring(
        models, [torch.optim.SGD(m.parameters(), lr=0.05) for m in models], every=1, same_init=False
    )
    for j, (m, o) in enumerate(zip(models, opts, strict=True)):
        _train_step(m, o, j)
    assert [o.rounds for o in opts] == [1, 1]
    opts[0].close()
    before = _state(models[0])
    x, y = _batch(5)
    for _ in range(3):
        opts[0].zero_grad()
        nn.functional.cross_entropy(models[0](x), y).backward()
        grads = {n: p.grad.clone() for n, p in models[0].named_parameters()}
        want = {n: p.detach() - 0.05 * grads[n] for n, p in models[0].named_parameters()}
        opts[0].step()
        for n, p in models[0].named_parameters():  # the inner step alone, no blend
            torch.testing.assert_close(p.detach(), want[n], msg=n)
    assert opts[0].rounds == 1
    assert not torch.equal(before["conv1.weight"], models[0].conv1.weight)
    # The host can be wrapped again, by one live wrapper.
    again = GraftOptimizer(torch.optim.SGD(models[0].parameters(), lr=0.0), [models[1]], every=1)
    again.step()
    assert again.rounds == 1 and opts[0].rounds == 1


def test_model_must_be_the_one_the_optimizer_trains() -> None:
    a, b, c = make_net(0), make_net(1), make_net(2)
    with pytest.raises(ValueError, match="none of whose parameters this optimizer trains"):
        GraftOptimizer(torch.optim.SGD(a.parameters(), lr=0.1), [c], every=1, model=b)


@pytest.mark.parametrize("bins", [0, 1, 257, 2.5])
def test_bins_the_kernels_cannot_count_are_refused_up_front(bins) -> None:
    a, b = make_net(0), make_net(1)
    with pytest.raises(ValueError, match=r"bins must be an integer in \[2, 256\]"):
        GraftOptimizer(torch.optim.SGD(a.parameters(), lr=0.1), [b], bins=bins)
    with pytest.raises(ValueError, match=r"bins must be an integer in \[2, 256\]"):
        graftopt.functional.entropy(torch.randn(10), bins=bins)


def test_weight_average_peers_are_unwrapped() -> None:
    """An SWA or EMA model as a peer grafts from the network it averages, as DDP's does."""
    from timm.utils import ModelEmaV3
    from torch.optim.swa_utils import AveragedModel

    for wrap in (AveragedModel, ModelEmaV3):
        host, peer = make_net(0), make_net(1)
        averaged = wrap(peer)
        expected = ref_graft(host, [averaged.module])
        GraftOptimizer(torch.optim.SGD(host.parameters(), lr=0.0), [averaged], every=1).step()
        torch.testing.assert_close(
            host.fc.weight.double(), expected["fc.weight"], atol=2e-5, rtol=1e-5
        )


def test_rate_by_lr_follows_onecycle_peak_and_warns_under_cyclic() -> None:
    host, peer = make_net(0), make_net(1)
    inner = torch.optim.SGD(host.parameters(), lr=0.1, momentum=0.9)
    torch.optim.lr_scheduler.OneCycleLR(inner, max_lr=1.0, total_steps=100)
    opt = GraftOptimizer(inner, [peer], every=1, rate=0.5, rate_by_lr=True)
    assert opt.current_rate() == pytest.approx(0.5 * 0.04)  # lr 0.04 of the peak 1.0
    host, peer = make_net(2), make_net(3)
    inner = torch.optim.SGD(host.parameters(), lr=0.1, momentum=0.9)
    cyclic = torch.optim.lr_scheduler.CyclicLR(inner, base_lr=0.01, max_lr=1.0, step_size_up=5)
    opt = GraftOptimizer(inner, [peer], every=1, rate=0.5, rate_by_lr=True)
    for _ in range(3):
        cyclic.step()
    with pytest.warns(RuntimeWarning, match="does not start at its peak"):
        assert opt.current_rate() == 1.0
    inner.param_groups[0]["max_lr"] = 1.0
    assert opt.current_rate() == pytest.approx(0.5 * inner.param_groups[0]["lr"])


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("criterion", ["entropy", "l1"])
@pytest.mark.parametrize("shape", [(0, 4), (4, 0)])
def test_empty_layers_are_left_out_of_rounds(criterion: str, shape) -> None:
    """A layer with zero filters or zero inputs has nothing to score: it is no unit."""

    def seq(seed: int) -> nn.Sequential:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, 4), nn.Linear(*shape), nn.Linear(shape[1], 3))

    host, peer = seq(0), seq(1)
    before = _state(host)
    opt = GraftOptimizer(
        torch.optim.SGD(host.parameters(), lr=0.0), [peer], every=1, criterion=criterion
    )
    assert "1" not in [u.name for u in opt.units]
    opt.step()
    assert opt.rounds == 1
    assert all(torch.isfinite(v).all() for v in host.state_dict().values())
    assert not torch.equal(host[0].weight, before["0.weight"])


def test_round_warnings_point_at_the_users_step() -> None:
    host, peer = make_net(0), make_net(1)
    with torch.no_grad():
        peer.fc.weight.fill_(float("nan"))
    opt = GraftOptimizer(torch.optim.SGD(host.parameters(), lr=0.0), [peer], every=1)
    with pytest.warns(RuntimeWarning, match="hold NaN or Inf") as caught:
        opt.step()
    assert caught[0].filename == __file__
