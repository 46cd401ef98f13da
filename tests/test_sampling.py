import pytest
import torch
from diffusers import DDPMScheduler

from conftest import across_shapes_atol, assert_close_across_shapes, perturbed_mlp
from priorlab.errors import UserError
from priorlab.models import mlp, unet
from priorlab.priors import NONE, SELF, BasePrior, MixPrior, PriorWeights, make_prior
from priorlab.priors import DenoiserPrior as Prior
from priorlab.sampling import sample


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = unet((1, 8, 8), 3, block_out_channels=(8, 16), norm_num_groups=4).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


# ddpm and euler_a draw per-step noise from each sample's generator; unipc, dpm and PNDM are deterministic and
# their step() takes no generator
@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "euler_a", "unipc", "dpm", "PNDMScheduler"])
def test_per_sample_seeds_are_invariant_to_batch_size(sampler):
    # a toy2d MLP (the seeds' path through the sampler does not depend on the network; a UNet is 7x slower here)
    model = perturbed_mlp()
    sched = DDPMScheduler()
    labels, seeds = torch.tensor([0, 1, 2, 0, 1, 2, 0]), torch.arange(100, 107)
    kw = dict(train_scheduler=sched, sample_shape=(2,), scale=2.0, sampler=sampler, num_steps=5)
    full = sample(model, labels, seeds, batch_size=7, **kw)
    # other batch sizes are other batch shapes: equal up to float rounding, over 5 network passes
    for bs in (1, 3):
        assert_close_across_shapes(sample(model, labels, seeds, batch_size=bs, **kw), full, passes=5)
    part = sample(model, labels[4:], seeds[4:], batch_size=2, **kw)  # sample i does not depend on the others
    assert_close_across_shapes(part, full[4:], passes=5)
    other = sample(model, labels, seeds + 1, batch_size=7, **kw)
    assert (other - full).abs().mean() > max(0.1, 10 * across_shapes_atol(full, passes=5))  # other seeds are seen


def test_prior_self_and_base_share_noise(model):
    sched = DDPMScheduler()
    labels, seeds = torch.tensor([0, 1, 2]), torch.tensor([5, 6, 7])
    kw = dict(train_scheduler=sched, sample_shape=(1, 8, 8), scale=3.0, num_steps=5, batch_size=3)
    a = sample(model, labels, seeds, prior=SELF, **kw)
    base = Prior(model, sched, sched.alphas_cumprod)
    b = sample(model, labels, seeds, prior=BasePrior(base), **kw)
    # self evaluates cond and ∅ as one batch of 6 rows, base as two batches of 3: other shapes, 5 network passes
    assert_close_across_shapes(a, b, passes=5)
    other = sample(model, labels, seeds + 1, prior=BasePrior(base), **kw)
    assert (other - a).abs().mean() > max(0.1, 10 * across_shapes_atol(b, passes=5))  # other noise would be seen


def test_unknown_sampler_is_an_error():
    m = mlp((2,), 2, hidden=8, depth=1)
    with pytest.raises(UserError, match="sampler=nope is not a diffusers scheduler"):
        sample(m, torch.tensor([0]), torch.tensor([0]), DDPMScheduler(), (2,), sampler="nope")


def test_interval_decided_per_step_on_the_host_equals_the_per_row_decision(model, monkeypatch):
    """sample() decides on the host whether a step lies in the guidance interval (so it need not read GPU
    values); the result must equal guide()'s own per-row decision, and the prior runs only inside."""
    import priorlab.sampling as sampling
    from priorlab.guidance import guide, sigma

    sched = DDPMScheduler()
    labels, seeds = torch.tensor([0, 1, 2]), torch.tensor([5, 6, 7])
    calls = []

    def counting(x, t, labels):
        calls.append(len(x))
        return model(x, t, labels)

    base_net = torch.nn.Module()  # a stand-in denoiser that counts its rows
    base_net.forward, base_net.null_class, base_net.prediction_type = counting, model.null_class, "epsilon"
    base = Prior(base_net, sched, sched.alphas_cumprod)
    ddim = sampling.make_scheduler("ddim", sched)
    ddim.set_timesteps(6)
    sig = sigma(sched.alphas_cumprod[ddim.timesteps]).sort().values
    interval = (float(sig[1]), float(sig[3]))  # three of the six steps
    kw = dict(train_scheduler=sched, sample_shape=(1, 8, 8), scale=3.0, num_steps=6, batch_size=3,
              prior=BasePrior(base), interval=interval)  # fmt: skip
    new = sample(model, labels, seeds, **kw)
    assert calls == [3, 3, 3]
    everywhere = sample(model, labels, seeds, **{**kw, "interval": None})
    assert (new - everywhere).abs().max() > 100 * across_shapes_atol(new, passes=6)  # the interval matters

    def per_row(model, x, t, labels, abar_t, scale, prior, interval=None, overlap=True):
        return guide(model, x, t, labels, abar_t, kw["scale"], prior, kw["interval"], overlap)

    monkeypatch.setattr(sampling, "guide", per_row)
    old = sample(model, labels, seeds, **kw)
    # bit for bit: both evaluate θ and ψ on the same 3-row batches at every step (the general path's rows are all
    # rows, and combine() selects ψ's prediction exactly), so this is the same computation
    assert torch.equal(new, old)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (bench/guided_sampling.py)")


def _bf16_close(a: torch.Tensor, b: torch.Tensor) -> None:
    """A CUDA graph replays the launched kernels, but bf16 autocast on a GPU may pick others: equal up to bf16
    rounding."""
    torch.testing.assert_close(a, b, rtol=0, atol=0.05)


def _equal(a: torch.Tensor, b: torch.Tensor) -> None:
    """A recorded graph (`recorded_graphs`) replays the very CPU operations that the launched step runs, on the same
    shapes, in this process: the same computation, bit for bit."""
    assert torch.equal(a, b), (a - b).abs().max()


def _graphed_guided_steps(model, prior: str, device: str, close) -> int:
    """`sample(graphs=True)` on `device` equals `sample()` (`close`), and a second call of the same shapes replays
    the cached graphs; returns how many entries the graph cache held for the network (its graphs and the pool)."""
    from priorlab.sampling import _GRAPHS

    net = unet((1, 8, 8), 3, block_out_channels=(8, 16), norm_num_groups=4).to(device).eval()
    net.load_state_dict(model.state_dict())
    sched = DDPMScheduler()
    base = Prior(net, sched, sched.alphas_cumprod)
    labels, seeds = torch.tensor([0, 1, 2, 0]), torch.arange(4)
    kw = dict(
        train_scheduler=sched,
        sample_shape=(1, 8, 8),
        scale=3.0,
        num_steps=6,
        batch_size=4,
        autocast=True,
        prior=SELF if prior == "self" else BasePrior(base),
        interval=(0.5, 5.0) if prior == "interval" else None,
    )
    launched = sample(net, labels, seeds, graphs=False, **kw)
    graphed = sample(net, labels, seeds, graphs=True, **kw)
    close(graphed, launched)
    captured = len(_GRAPHS[net])
    again = sample(net, labels, seeds, graphs=True, **kw)
    assert len(_GRAPHS[net]) == captured and torch.equal(again, graphed)
    return captured


@CUDA
@pytest.mark.parametrize("prior", ["self", "base", "interval"])
def test_graphed_guided_steps_equal_launched_ones_and_are_captured_once(model, prior):
    """A step replayed from its CUDA graph computes what the launched step computes (same kernels, same shapes:
    equal up to bf16 rounding under autocast), and a second sample() of the same shapes replays the cached graphs."""
    _graphed_guided_steps(model, prior, "cuda", _bf16_close)


@pytest.mark.parametrize("prior", ["self", "base", "interval"])
def test_graphed_guided_steps_recorded_on_the_cpu_equal_launched_ones_and_are_captured_once(model, prior,
                                                                                               cpu_graphs):  # fmt: skip
    """The CUDA test above with graphs recorded on the CPU: every step is replayed (6 per call), from one graph
    per kind of step (guided; unguided too outside the interval), each captured once."""
    kinds = 2 if prior == "interval" else 1
    assert _graphed_guided_steps(model, prior, "cpu", _equal) == 1 + kinds  # and the pool
    assert cpu_graphs.captures == kinds
    assert cpu_graphs.replays == 2 * 6


def test_a_replay_reads_its_inputs_anew_and_its_output_outlives_the_next_replay(cpu_graphs):
    """Each call copies its inputs into the graph's buffers, and returns the caller's own copy of the output buffer,
    which the next replay rewrites."""
    from priorlab.sampling import GraphedStep

    weight = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))

    def fn(x: torch.Tensor) -> torch.Tensor:
        return (x @ weight).relu() * 2

    step = GraphedStep(fn, (torch.zeros(2, 3),))
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    out_a = step(a)
    kept = out_a.clone()
    out_b = step(b)
    _equal(out_a, kept)
    _equal(out_a, fn(a))
    _equal(out_b, fn(b))
    assert cpu_graphs.captures == 1 and cpu_graphs.replays == 2
    with pytest.raises(RuntimeError, match="a CUDA graph cannot capture it"):  # nor can the stand-in
        GraphedStep(lambda x: x[x > 0], (a,))


def test_graph_keys_name_where_every_weight_and_buffer_of_each_network_lives(model):
    """A graph reads weights and buffers by address: the same tensors give the same key; θ's buffer (DiT's position
    table), θ's weight or ψ's weight swapped for another tensor, another ψ, or no ψ, give another key."""
    from priorlab.models import dit
    from priorlab.sampling import weights_key

    torch.manual_seed(0)
    net = dit((1, 8, 8), 3)
    sched = DDPMScheduler()
    prior = Prior(model, sched, sched.alphas_cumprod)
    keys = [weights_key(net, prior)]
    assert weights_key(net, prior) == keys[0]
    patch = net.net.pos_embed
    patch.pos_embed = patch.pos_embed.clone()  # still the module's buffer, at another address
    keys.append(weights_key(net, prior))
    with torch.no_grad():
        net.net.proj_out_2.weight = torch.nn.Parameter(net.net.proj_out_2.weight.clone())
        keys.append(weights_key(net, prior))
        keep = model.net.conv_in.weight  # restored below: the module fixture is shared
        model.net.conv_in.weight = torch.nn.Parameter(keep.clone())
        keys.append(weights_key(net, prior))
        model.net.conv_in.weight = keep
    keys += [weights_key(net, Prior(model, sched, sched.alphas_cumprod)), weights_key(net, None), weights_key(net)]
    assert len(set(keys)) == len(keys)


class _RunInstead:
    """Stands in for `GraphedStep` on the CPU, to test the graph cache: runs the step instead of replaying it."""

    def __init__(self, fn, inputs, pool=None):
        self.fn = fn

    def __call__(self, *inputs):
        return self.fn(*inputs)


def test_graph_cache_shares_graphs_that_read_no_prior_and_drops_a_priors_graphs_when_it_dies(model, monkeypatch):
    """Each evaluation builds its prior networks anew. prior=self's graphs read none of them, so they are keyed
    without them and shared across evaluations; a graph that reads a prior network goes when that network dies,
    rather than piling up for as long as the model lives."""
    import gc

    import priorlab.sampling as sampling_module

    monkeypatch.setattr(sampling_module, "GraphedStep", _RunInstead)
    monkeypatch.setattr(sampling_module, "can_graph", lambda device, *nets: True)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    sched = DDPMScheduler()
    kw = dict(train_scheduler=sched, sample_shape=(1, 8, 8), scale=3.0, num_steps=3, batch_size=3)
    labels, seeds = torch.tensor([0, 1, 2]), torch.arange(3)
    launched = sample(model, labels, seeds, prior=SELF, **kw)
    graphed = sample(model, labels, seeds, prior=make_prior("self", Prior(model, sched, sched.alphas_cumprod)),
                     graphs=True, **kw)  # fmt: skip
    torch.testing.assert_close(graphed, launched)
    graphs = sampling_module._GRAPHS[model]
    count = len(graphs)
    sample(model, labels, seeds, prior=make_prior("self", Prior(model, sched, sched.alphas_cumprod)), graphs=True,
           **kw)  # fmt: skip
    assert len(graphs) == count  # another evaluation's prior network: the same graphs

    prior = Prior(model, sched, sched.alphas_cumprod)
    step = sampling_module.graphed_step(model, ("weights",), ("key",), lambda x: 2 * x, (torch.ones(2),), keep=(prior,))
    assert torch.equal(step(torch.ones(2)), torch.full((2,), 2.0)) and len(graphs) == count + 1
    del prior, step
    gc.collect()
    assert len(graphs) == count


def test_graphed_steps_cast_without_autocasts_cache(model, monkeypatch):
    """Under a caller's own autocast, cached bf16 copies of the weights would be made outside the graph and freed
    when that caller's context ends, then read from the graph: captured steps run with the cache off."""
    import priorlab.sample_many as many_module
    import priorlab.sampling as sampling_module

    monkeypatch.setattr(sampling_module, "GraphedStep", _RunInstead)
    monkeypatch.setattr(sampling_module, "can_graph", lambda device, *nets: True)
    monkeypatch.setattr(many_module, "can_graph", lambda device, *nets: True)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    cached = []
    for module, name in ((sampling_module, "guide"), (many_module, "guide_blocks")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, **k: cached.append(torch.is_autocast_cache_enabled())
                            or _f(*a, **k))  # fmt: skip
    sched = DDPMScheduler()
    kw = dict(train_scheduler=sched, sample_shape=(1, 8, 8), num_steps=2, batch_size=3)
    labels, seeds = torch.tensor([0, 1, 2]), torch.arange(3)
    sample(model, labels, seeds, prior=SELF, scale=3.0, graphs=True, **kw)
    from priorlab.sample_many import sample_many

    sample_many(model, labels, seeds, settings=_many_settings(model, sched), graphs=True, **kw)
    assert len(cached) >= 4 and not any(cached)


def test_only_a_priorlab_denoiser_on_the_models_gpu_is_read_from_a_graph(model):
    """A prior on another device runs outside the graph, and a diffusers pipeline's prior reads null-condition
    tensors that no key names: steps that read them run launched."""
    from priorlab.priors import PriorNet
    from priorlab.sampling import can_graph

    class Stand(PriorNet):  # a prior network that is not a priorlab denoiser, without weights
        module = torch.nn.Identity()

    sched = DDPMScheduler()
    on_cpu = Prior(model, sched, sched.alphas_cumprod)
    assert not can_graph(torch.device("cpu"))
    assert not can_graph(torch.device("cuda"), on_cpu)
    assert not can_graph(torch.device("cuda"), Stand(sched.alphas_cumprod, "epsilon"))
    assert can_graph(torch.device("cuda"))  # no prior network read: θ alone decides, on its GPU


def _weights_and_tables_are_never_stale(model, monkeypatch, device: str, close) -> None:
    """The body of the test below, on `device`, graphed and launched samples compared with `close`."""
    import priorlab.sampling as sampling_module
    from priorlab.sample_many import sample_many

    net = unet((1, 8, 8), 3, block_out_channels=(8, 16), norm_num_groups=4).to(device).eval()
    net.load_state_dict(model.state_dict())
    sched = DDPMScheduler()
    settings = _many_settings(net, sched, device)
    small = settings[3].prior.net  # ψ with weights of its own
    reads = []
    pointers = sampling_module._pointers
    monkeypatch.setattr(sampling_module, "_pointers", lambda m: reads.append(m) or pointers(m))
    kw = dict(labels=torch.tensor([0, 1, 2, 0]), seeds=torch.arange(4), sample_shape=(1, 8, 8), batch_size=4,
              autocast=True)  # fmt: skip
    for steps in (3, 6):
        reads.clear()
        sample(net, train_scheduler=sched, scale=3.0, prior=BasePrior(small), num_steps=steps, graphs=True,
               **kw)  # fmt: skip
        assert len(reads) == 2  # θ and ψ, once each, whatever the number of steps
        reads.clear()
        sample_many(net, train_scheduler=sched, settings=settings, num_steps=steps, graphs=True, **kw)
        assert len(reads) == 1 + len(settings)

    def graphed_equals_launched(train_scheduler) -> torch.Tensor:
        one = dict(train_scheduler=train_scheduler, scale=3.0, prior=BasePrior(small), num_steps=6, **kw)
        graphed = sample(net, graphs=True, **one)
        close(graphed, sample(net, **one))
        many = dict(train_scheduler=train_scheduler, settings=settings, num_steps=6, **kw)
        for a, b in zip(sample_many(net, graphs=True, **many), sample_many(net, **many), strict=True):
            close(a, b)
        return graphed

    first = graphed_equals_launched(sched)
    hog = [torch.full((1000,), 0.5, device=device) for _ in range(256)]  # takes the blocks the last ᾱ copies freed
    assert torch.equal(graphed_equals_launched(sched), first)
    for module in (net.net.conv_in, small.module.net.conv_in):  # θ's weight alone, then ψ's alone
        with torch.no_grad():
            module.weight = torch.nn.Parameter(module.weight * 2)  # another tensor, at another address
        swapped = graphed_equals_launched(sched)
        assert (swapped - first).abs().max() > 0.1  # the swap changed the samples
        first = swapped
    other = graphed_equals_launched(DDPMScheduler(beta_schedule="squaredcos_cap_v2"))
    assert (other - first).abs().max() > 0.1
    del hog
    import gc

    graphs = sampling_module._GRAPHS[net]
    count = len(graphs)
    passing = Prior(small.module, sched, sched.alphas_cumprod)  # an evaluation's prior network, built for it
    sample(net, train_scheduler=sched, scale=3.0, prior=BasePrior(passing), num_steps=6, graphs=True, **kw)
    assert len(graphs) > count
    del passing
    gc.collect()
    assert len(graphs) == count  # its graphs went with it


@CUDA
def test_graphs_read_weight_addresses_once_per_call_and_never_replay_stale_memory(model, monkeypatch):
    """A graph reads by address. Weights are keyed by where they live, read once per sampling call (each read walks
    every weight), so θ's or ψ's weight swapped for a tensor elsewhere is captured anew; the ᾱ table, which each
    call copies to the device anew, is an input copied into the graph's own buffer, so a later call whose old table's
    memory now holds something else, or whose schedule differs, still replays what the launched step computes."""
    _weights_and_tables_are_never_stale(model, monkeypatch, "cuda", _bf16_close)


def test_graphs_recorded_on_the_cpu_never_replay_stale_weights_or_tables(model, monkeypatch, cpu_graphs):
    """The CUDA test above with graphs recorded on the CPU, which read the weights they captured and their input
    buffers as a CUDA graph does: a swapped weight left out of the key, or an ᾱ table not copied into the graph's
    buffer, would replay stale values."""
    _weights_and_tables_are_never_stale(model, monkeypatch, "cpu", _equal)
    assert cpu_graphs.captures > 0 and cpu_graphs.replays > cpu_graphs.captures


def test_graphs_on_the_cpu_are_the_launched_computation(model):
    """graphs=True needs a GPU; elsewhere it runs the same launched steps (the evaluation may set it everywhere)."""
    sched = DDPMScheduler()
    kw = dict(train_scheduler=sched, sample_shape=(1, 8, 8), scale=3.0, num_steps=3, batch_size=3,
              prior=BasePrior(Prior(model, sched, sched.alphas_cumprod)))  # fmt: skip
    labels, seeds = torch.tensor([0, 1, 2]), torch.arange(3)
    assert torch.equal(sample(model, labels, seeds, graphs=True, **kw), sample(model, labels, seeds, **kw))


def _many_settings(model, sched, device="cpu"):
    from priorlab.sample_many import Setting

    torch.manual_seed(1)
    other = unet((1, 8, 8), 3, block_out_channels=(8, 16), norm_num_groups=4).to(device).eval()
    base, small = Prior(model, sched, sched.alphas_cumprod), Prior(other, sched, sched.alphas_cumprod)
    return [Setting(SELF, 1.0), Setting(SELF, 3.0), Setting(BasePrior(base), 3.0), Setting(BasePrior(small), 2.0),
            Setting(NONE, 4.0)]  # fmt: skip


def test_one_pass_with_graphs_on_the_cpu_is_the_launched_computation(model):
    """sample_many(graphs=True) needs a GPU to capture; elsewhere it runs the same launched steps."""
    from priorlab.sample_many import sample_many

    sched = DDPMScheduler()
    kw = dict(labels=torch.tensor([0, 1, 2]), seeds=torch.arange(3), train_scheduler=sched, sample_shape=(1, 8, 8),
              settings=_many_settings(model, sched), num_steps=3, batch_size=2, interval=(0.5, 5.0))  # fmt: skip
    for a, b in zip(sample_many(model, graphs=True, **kw), sample_many(model, **kw), strict=True):
        assert torch.equal(a, b)


def _one_pass_graphed(model, device: str, close) -> None:
    """`sample_many(graphs=True)` on `device` equals the launched pass (`close`), captured once per chunk size and
    kind of step."""
    from priorlab.sample_many import sample_many
    from priorlab.sampling import _GRAPHS

    net = unet((1, 8, 8), 3, block_out_channels=(8, 16), norm_num_groups=4).to(device).eval()
    net.load_state_dict(model.state_dict())
    sched = DDPMScheduler()
    kw = dict(labels=torch.tensor([0, 1, 2, 0, 1]), seeds=torch.arange(5), train_scheduler=sched,
              sample_shape=(1, 8, 8), settings=_many_settings(net, sched, device), num_steps=6, batch_size=3,
              interval=(0.5, 5.0), autocast=True)  # fmt: skip
    launched = sample_many(net, graphs=False, **kw)
    graphed = sample_many(net, graphs=True, **kw)
    for a, b in zip(graphed, launched, strict=True):
        close(a, b)
    captured = len(_GRAPHS[net])
    assert captured >= 1 + 4  # the pool, and chunks of 3 and 2 samples, each with guided and unguided steps
    again = sample_many(net, graphs=True, **kw)
    assert len(_GRAPHS[net]) == captured
    assert all(torch.equal(a, b) for a, b in zip(again, graphed, strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (bench/eval_cost.py)")
def test_one_pass_replayed_from_graphs_equals_the_launched_pass_and_is_captured_once(model):
    """Each step of a one_pass pass (θ over every row, each prior network over its settings' rows, the
    combinations) replayed from one CUDA graph computes what the launched pass computes, chunk sizes and the
    guidance interval included; a second call of the same shapes replays the cached graphs."""
    _one_pass_graphed(model, "cuda", _bf16_close)


def test_one_pass_recorded_on_the_cpu_equals_the_launched_pass_and_is_captured_once(model, cpu_graphs):
    """The CUDA test above with graphs recorded on the CPU: 4 graphs (2 chunks × guided or not), each captured
    once, replayed at each of the 6 steps of both chunks in both graphed calls."""
    _one_pass_graphed(model, "cpu", _equal)
    assert cpu_graphs.captures == 4 and cpu_graphs.replays == 2 * 2 * 6


@pytest.mark.parametrize(("sampler", "interval"), [("ddim", None), ("ddpm", None), ("ddim", (0.5, 5.0))])
def test_one_pass_of_several_settings_equals_each_sampled_alone(model, sampler, interval):
    """sample_many runs every (prior, w) trajectory side by side: each equals `sample` of that setting alone, up to
    the rounding of other batch shapes, with stochastic samplers too (each row keeps its own generator)."""
    from priorlab.sample_many import Setting, sample_many

    sched = DDPMScheduler()
    torch.manual_seed(1)
    other = unet((1, 8, 8), 3, block_out_channels=(8, 16), norm_num_groups=4).eval()
    base, small = Prior(model, sched, sched.alphas_cumprod), Prior(other, sched, sched.alphas_cumprod)
    labels, seeds = torch.tensor([0, 1, 2, 0, 1]), torch.arange(40, 45)
    settings = [Setting(SELF, 1.0), Setting(SELF, 3.0), Setting(BasePrior(base), 3.0), Setting(BasePrior(small), 2.0),
                Setting(NONE, 4.0), Setting(SELF, 2.0)]  # fmt: skip
    kw = dict(train_scheduler=sched, sample_shape=(1, 8, 8), sampler=sampler, num_steps=5, interval=interval)
    many = sample_many(model, labels, seeds, settings=settings, batch_size=3, **kw)
    assert len(many) == len(settings) and all(x.shape == (5, 1, 8, 8) for x in many)
    for s, x in zip(settings, many, strict=True):
        alone = sample(model, labels, seeds, scale=s.scale, prior=s.prior, batch_size=5, **kw)
        assert_close_across_shapes(x, alone, passes=5)
    if interval is None:  # the settings differ from each other by more than the tolerance: each is its own
        assert (many[1] - many[5]).abs().mean() > 10 * across_shapes_atol(many[1], passes=5)
        assert (many[2] - many[3]).abs().mean() > 10 * across_shapes_atol(many[2], passes=5)


def test_one_pass_refuses_a_fitted_prior_and_a_base_without_its_network(model):
    from priorlab.sample_many import Setting, sample_many

    kw = dict(labels=torch.tensor([0]), seeds=torch.tensor([0]), train_scheduler=DDPMScheduler(),
              sample_shape=(1, 8, 8))  # fmt: skip
    sched = DDPMScheduler()
    auto = MixPrior(Prior(model, sched, sched.alphas_cumprod), PriorWeights([0, 1000], [0.0], "auto"))
    with pytest.raises(UserError, match="prior=auto cannot share a sampling pass"):
        sample_many(model, settings=[Setting(auto, 2.0)], **kw)
    with pytest.raises(UserError, match="prior=base needs a base model"):
        sample_many(model, settings=[Setting(make_prior("base"), 2.0)], **kw)


def test_one_pass_under_bf16_autocast_agrees_with_each_setting_alone(model):
    """The autocast path of sample_many (the GPU presets sample in bf16): bf16 networks, float32 combination."""
    from priorlab.sample_many import Setting, sample_many

    sched = DDPMScheduler()
    base = Prior(model, sched, sched.alphas_cumprod)
    labels, seeds = torch.tensor([0, 1, 2]), torch.arange(3)
    kw = dict(train_scheduler=sched, sample_shape=(1, 8, 8), num_steps=4, autocast=True)
    settings = [Setting(SELF, 3.0), Setting(BasePrior(base), 2.0)]
    many = sample_many(model, labels, seeds, settings=settings, batch_size=3, **kw)
    assert all(x.dtype == torch.float32 for x in many)
    for s, x in zip(settings, many, strict=True):
        alone = sample(model, labels, seeds, scale=s.scale, prior=s.prior, batch_size=3, **kw)
        torch.testing.assert_close(x, alone, rtol=0, atol=0.05)  # bf16 rounding of other batch shapes
