"""DistLion in one process: exactly Lion, argument checks, state_dict, precision."""

import copy

import pytest
import torch
from lion_pytorch import Lion

from distlion import DistLion


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # every coordinate gets a non-zero gradient, so Lion's sign(0) = 0 never meets the zero rule
    return torch.nn.Sequential(torch.nn.Linear(12, 64), torch.nn.GELU(), torch.nn.LayerNorm(64),
                               torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 50))


def _batches(steps: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 12, generator=gen), torch.randint(0, 50, (16,), generator=gen))
            for _ in range(steps)]


def _train(model, optimizer, batches, scheduler=None):
    for x, y in batches:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def test_world_size_one_equals_lion_bitwise():
    reference, model = _model(), _model()
    batches = _batches(60)
    lion = Lion(reference.parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1)
    ours = DistLion(model.parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1)
    _train(reference, lion, batches)
    _train(model, ours, batches)
    for a, b in zip(reference.parameters(), model.parameters()):
        assert torch.equal(a, b)
        # the momentum too (it is written by the pack pass and swapped in when the step is taken)
        assert torch.equal(lion.state[a]["exp_avg"], ours.state[b]["exp_avg"])
    assert ours.comm_stats.steps == 60 and ours.comm_stats.bytes_sent == 0


def test_param_groups_and_scheduler_match_lion():
    reference, model = _model(), _model()

    def groups(m):
        return [{"params": list(m[0].parameters()), "lr": 1e-2, "weight_decay": 0.0},
                {"params": [p for layer in m[1:] for p in layer.parameters()], "betas": (0.95, 0.98)}]
    lion = Lion(groups(reference), lr=3e-3, weight_decay=0.2)
    ours = DistLion(groups(model), lr=3e-3, weight_decay=0.2)
    batches = _batches(20)
    _train(reference, lion, batches, torch.optim.lr_scheduler.StepLR(lion, 5, gamma=0.5))
    _train(model, ours, batches, torch.optim.lr_scheduler.StepLR(ours, 5, gamma=0.5))
    for a, b in zip(reference.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert len(ours.layout.buckets) == 2  # a bucket never spans two groups


def test_unused_parameter_oscillates_instead_of_drifting():
    model = _model()
    unused = torch.nn.Parameter(torch.zeros(10))
    opt = DistLion([*model.parameters(), unused], lr=0.1)
    values = []
    for x, y in _batches(6):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        values.append(unused.detach().clone())
    assert all(v.abs().max() <= 0.1 + 1e-6 for v in values)  # never more than one lr away from 0
    steps = torch.stack([values[0]] + [b - a for a, b in zip(values, values[1:])])
    assert torch.equal(steps[1:].sign(), -steps[:-1].sign())  # every coordinate flips every step
    assert steps[0][0] == -steps[0][1]  # neighbours move opposite ways


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1.0), "learning rate: -1.0"),
    (dict(betas=(1.0, 0.99)), "beta parameter at index 0: 1.0"),
    (dict(betas=(0.9, -0.1)), "beta parameter at index 1: -0.1"),
    (dict(weight_decay=-0.5), "weight_decay value: -0.5"),
    (dict(vote="mean"), "vote: 'mean'"),
    (dict(exchange="ring"), "exchange: 'ring'"),
    (dict(bucket_cap_mb=0), "bucket_cap_mb: 0"),
    (dict(momentum_dtype=torch.int32), "momentum_dtype: torch.int32"),
    (dict(vote_ema_beta=1.0), "vote_ema_beta: 1.0"),
    (dict(vote_ema_beta=-0.1), "vote_ema_beta: -0.1"),
])
def test_invalid_arguments_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DistLion(_model().parameters(), **kwargs)


def test_sparse_gradient_is_refused():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = DistLion(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_nonfinite_gradient_skips_the_step():
    model = _model()
    opt = DistLion(model.parameters(), lr=1e-2, weight_decay=0.1)
    _train(model, opt, _batches(2))
    before = [p.detach().clone() for p in model.parameters()]
    momentum = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    next(model.parameters()).grad[0, 0] = float("nan")
    opt.step()
    assert opt.comm_stats.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(a, opt.state[p]["exp_avg"]) for a, p in zip(momentum, model.parameters()))


def test_training_after_a_skipped_step_is_as_if_it_never_happened():
    reference, model = _model(), _model()
    lion = Lion(reference.parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1)
    ours = DistLion(model.parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1)
    batches = _batches(6)
    _train(reference, lion, batches)
    _train(model, ours, batches[:3])
    for p in model.parameters():
        p.grad = torch.full_like(p, float("inf"))  # fills the scratch buffer with non-finite momentum
    ours.step()
    assert ours.comm_stats.skipped_steps == 1
    _train(model, ours, batches[3:])
    for a, b in zip(reference.parameters(), model.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(lion.state[a]["exp_avg"], ours.state[b]["exp_avg"])


def test_state_dict_round_trip_resumes_bitwise():
    batches = _batches(20)
    model = _model()
    opt = DistLion(model.parameters(), lr=3e-3, weight_decay=0.1)
    _train(model, opt, batches[:10])
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, batches[10:])

    resumed = _model(seed=5)
    resumed.load_state_dict(saved_model)
    opt2 = DistLion(resumed.parameters(), lr=1.0)
    opt2.load_state_dict(saved_opt)
    _train(resumed, opt2, batches[10:])
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert opt2.param_groups[0]["lr"] == 3e-3
    assert opt2.comm_stats.steps == 20


def test_load_refuses_foreign_state():
    model = _model()
    opt = DistLion(model.parameters())
    state = opt.state_dict()
    with pytest.raises(ValueError, match="not saved by DistLion"):
        opt.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())
    wrong = copy.deepcopy(state)
    wrong["distlion"]["world_size"] = 4
    with pytest.raises(ValueError, match="saved with world size 4 and ranks_per_node 1, but this run has world size 1 and"):
        opt.load_state_dict(wrong)
    other = DistLion(torch.nn.Linear(3, 3).parameters())
    with pytest.raises(ValueError, match="layout"):
        other.load_state_dict(state)


def test_scaled_step_on_one_group_follows_the_formula():
    """vote_ema_beta in one param group: that group's step is scaled, the other group is Lion's."""
    reference, model = _model(), _model()
    batches = _batches(8)
    lion = Lion(reference.parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1)
    first, rest = list(model.parameters())[:2], list(model.parameters())[2:]
    ours = DistLion([{"params": first, "vote_ema_beta": 0.8}, {"params": rest}], lr=3e-3, betas=(0.9, 0.99),
                    weight_decay=0.1)
    assert "vote_ema" in ours.state[first[0]] and "vote_ema" not in ours.state[rest[0]]
    ref_first = list(reference.parameters())[:2]
    x = [p.detach().clone() for p in ref_first]
    m = [torch.zeros_like(p) for p in ref_first]
    e = [torch.zeros_like(p) for p in ref_first]
    for step, batch in enumerate(batches, start=1):
        _train(model, ours, [batch])
        _train(reference, lion, [batch])  # the same gradients for the first group: same x so far
        for i, p in enumerate(ref_first):
            g = p.grad
            s = (m[i] * 0.9).add(g, alpha=0.1).sign()  # no exact zeros here (see _model)
            m[i] = (m[i] * 0.99).add(g, alpha=0.01)
            e[i] = (e[i] * 0.8).add(s, alpha=0.2)
            h = e[i] * (1 / (1 - 0.8 ** step))
            x[i] = (x[i] * (1 - 3e-3 * 0.1)).add(s * h * h, alpha=-3e-3)
            p.data.copy_(x[i])  # keep the reference's first group on the scaled path
        for a, b in zip(x, first):
            assert torch.equal(a, b), f"step {step}"
    for a, b in zip(list(reference.parameters())[2:], rest):
        assert torch.equal(a, b)


def test_scaled_step_setting_must_match_the_saved_state():
    model = _model()
    scaled = DistLion(model.parameters(), vote_ema_beta=0.9)
    _train(model, scaled, _batches(2))
    plain = DistLion(_model().parameters())
    with pytest.raises(ValueError, match="saved with vote_ema_beta=0.9 in param group 0, this optimizer has None"):
        plain.load_state_dict(scaled.state_dict())
    plain.param_groups[0]["vote_ema_beta"] = 0.9  # switched on after the buffers were built
    with pytest.raises(RuntimeError, match="vote_ema_beta=0.9 but was built without it"):
        _train(model, plain, _batches(1))


def test_bf16_parameters_get_fp32_master_weights():
    torch.manual_seed(0)
    fp32 = torch.nn.Linear(32, 32)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    opt32 = DistLion(fp32.parameters(), lr=1e-4)
    opt16 = DistLion(bf16.parameters(), lr=1e-4)
    x = torch.randn(8, 32)
    for _ in range(5):
        for model, opt, inp in ((fp32, opt32, x), (bf16, opt16, x.to(torch.bfloat16))):
            opt.zero_grad()
            model(inp).float().pow(2).sum().backward()
            opt.step()
    master = opt16.state[bf16.weight]["master"]
    assert master.dtype == torch.float32
    assert torch.equal(bf16.weight, master.to(torch.bfloat16))
    assert not torch.equal(master.to(torch.bfloat16).float(), master)  # steps of 1e-4 survive in the master
    assert opt16.state[bf16.weight]["exp_avg"].dtype == torch.float32


def test_momentum_dtype_option():
    model = torch.nn.Linear(8, 8)
    opt = DistLion(model.parameters(), momentum_dtype=torch.bfloat16)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    assert opt.state[model.weight]["exp_avg"].dtype == torch.bfloat16


def test_moving_parameters_after_construction_keeps_state():
    model, reference = _model(), _model()
    opt = DistLion(model.parameters(), lr=1e-2)
    reference_opt = DistLion(reference.parameters(), lr=1e-2)
    _train(model, opt, _batches(3))
    _train(reference, reference_opt, _batches(3))
    model[3].weight.data = model[3].weight.data.clone()  # what .to(device) does to a parameter
    batch = _batches(1, seed=9)
    _train(model, opt, batch)
    _train(reference, reference_opt, batch)
    for a, b in zip(reference.parameters(), model.parameters()):
        assert torch.equal(a, b)  # momentum was carried over
    flat = opt.layout.states[0].values
    assert flat.data_ptr() <= model[3].weight.data_ptr() < flat.data_ptr() + flat.numel() * flat.element_size()


def test_state_loaded_after_parameters_were_replaced_is_applied_at_the_next_step():
    batches = _batches(8)
    model, reference = _model(), _model()
    opt, reference_opt = DistLion(model.parameters(), lr=1e-2), DistLion(reference.parameters(), lr=1e-2)
    _train(model, opt, batches[:4])
    _train(reference, reference_opt, batches[:4])
    saved = copy.deepcopy(opt.state_dict())

    fresh = _model(seed=3)
    fresh_opt = DistLion(fresh.parameters(), lr=1e-2)
    for param in fresh.parameters():  # a wrapper moves the parameters out of the buckets...
        param.data = param.data.clone()
    fresh_opt.load_state_dict(saved)  # ...the optimizer state is loaded...
    fresh.load_state_dict(model.state_dict())  # ...then the weights, into the moved parameters
    flat = fresh_opt.layout.states[0].values
    end = flat.data_ptr() + flat.numel() * flat.element_size()
    assert not any(flat.data_ptr() <= p.data_ptr() < end for p in fresh.parameters())  # none in the bucket
    _train(fresh, fresh_opt, batches[4:])
    _train(reference, reference_opt, batches[4:])
    for a, b in zip(reference.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_grad_scaler_unscale_then_clip_then_step_equals_the_unscaled_step():
    """nanoGPT's fp16 loop: scale, backward, scaler.unscale_, clip_grad_norm_, scaler.step, scaler.update."""
    def run(scaled: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Linear(16, 4)
        opt = DistLion(model.parameters(), lr=1e-2, weight_decay=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, enabled=scaled)
        for step in range(3):
            x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step))
            scaler.scale(model(x).pow(2).mean()).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        # the momentum shows a gradient unscaled twice (or not at all); the signs alone might not
        return [p.detach().clone() for p in model.parameters()] + [opt.state[p]["exp_avg"] for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(True), run(False)))
