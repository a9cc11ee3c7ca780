"""Unit tests of DADF's parts: prior description, dual attention, flows, torch model."""

import pytest
import torch
from anomalib.data import InferenceBatch
from anomalib.models.components import GaussianBlur2d
from anomalib.models.image.fastflow.torch_model import create_fast_flow_block, subnet_conv_func

from anomalib_dadf.anomaly_map import AnomalyMapGenerator
from anomalib_dadf.components import (
    DiscriminativeFlow,
    DualAttention,
    DualAttentionTransformer,
    PositionalFlow,
    describe_prior,
    flow_with_log_jacobian_map,
    neighbourhood_pooling,
)
from anomalib_dadf.metrics import with_norm_log_jacobians
from anomalib_dadf.torch_model import DadfModel

BACKBONES = {
    "resnet18": (("layer1", "layer2", "layer3"), (64, 128, 256)),
    "tf_efficientnet_lite0": (("blocks.1", "blocks.2", "blocks.4"), (24, 40, 112)),
}


@pytest.mark.parametrize("backbone", BACKBONES)
def test_prior_is_read_from_the_backbone(backbone: str) -> None:
    layers, channels = BACKBONES[backbone]
    scales = describe_prior(backbone, layers)
    assert scales.channels == channels
    assert scales.strides == (4, 8, 16)
    assert scales.patch_sizes == (4, 2, 1)
    assert scales.grid_size((256, 192)) == (16, 12)


@pytest.mark.parametrize(
    ("backbone", "layers", "message"),
    [
        ("resnet_does_not_exist", ("layer1", "layer2", "layer3"), "Unknown backbone"),
        ("resnet18", ("layer1", "layer2", "layer9"), r"Layer\(s\) \['layer9'\] not found"),
        ("resnet18", ("layer1", "layer2"), "at least 3 feature layers"),
        ("resnet18", ("layer1", "layer1", "layer2"), "needs different strides"),
    ],
)
def test_bad_backbone_configuration_is_named(backbone: str, layers: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        describe_prior(backbone, layers)


def test_four_layers_put_every_scale_on_the_coarsest_grid() -> None:
    scales = describe_prior("resnet18", ("layer1", "layer2", "layer3", "layer4"))
    assert scales.strides == (4, 8, 16, 32)
    assert scales.patch_sizes == (8, 4, 2, 1)
    assert scales.grid_size((128, 64)) == (4, 2)


def test_input_size_must_fit_the_grid() -> None:
    scales = describe_prior("resnet18", ("layer1", "layer2", "layer3"))
    with pytest.raises(ValueError, match=r"multiples of the coarsest feature stride \(16\).*for example, 96x256"):
        scales.grid_size((100, 256))


def _tiny_model(backbone: str, input_size: tuple[int, int]) -> DadfModel:
    layers, _ = BACKBONES[backbone]
    return DadfModel(
        input_size=input_size,
        backbone=backbone,
        layers=layers,
        pre_trained=False,
        embed_dim=16,
        depth=2,
        num_heads=2,
        flow_steps=2,
    )


@pytest.mark.parametrize("backbone", BACKBONES)
def test_shapes_through_every_part(backbone: str) -> None:
    input_size = (64, 96)
    model = _tiny_model(backbone, input_size).eval()
    images = torch.rand(3, 3, *input_size)
    _, channels = BACKBONES[backbone]

    priors = model.extract_priors(images)
    assert [tuple(prior.shape) for prior in priors] == [
        (3, channels[0], 16, 24),
        (3, channels[1], 8, 12),
        (3, channels[2], 4, 6),
    ]
    local, global_ = model.reconstruct(priors)
    assert [map_.shape for map_ in local] == [prior.shape for prior in priors]
    assert [map_.shape for map_ in global_] == [prior.shape for prior in priors]
    latents, log_jacobians = model.discriminate(priors, local, global_)
    assert [latent.shape[1] for latent in latents] == [3 * channel for channel in channels]
    assert [latent.shape[-2:] for latent in latents] == [prior.shape[-2:] for prior in priors]
    assert all(log_jacobian.shape == (3,) for log_jacobian in log_jacobians)

    output = model(images)
    assert output.anomaly_map.shape == (3, 1, *input_size)
    assert output.pred_score.shape == (3, 1)
    assert torch.allclose(output.pred_score, output.anomaly_map.amax(dim=(-2, -1)))


def test_wrong_images_get_a_clear_error() -> None:
    model = _tiny_model("resnet18", (64, 64)).eval()
    with pytest.raises(ValueError, match=r"expects images of shape \(batch, 3, 64, 64\), got \(1, 3, 80, 64\)"):
        model(torch.rand(1, 3, 80, 64))
    with pytest.raises(ValueError, match="convert grayscale images to 3 channels"):
        model(torch.rand(1, 1, 64, 64))


def _perturb_first_value_projection(attention: DualAttention) -> torch.utils.hooks.RemovableHandle:
    """Add noise to the values (not queries or keys) of the first stream that passes ``qkv``: the image."""
    calls = []

    def hook(_module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        calls.append(None)
        if len(calls) > 1:
            return None
        output = output.clone()
        value_slice = slice(2 * attention.attn_dim, 3 * attention.attn_dim)
        output[..., value_slice] += torch.randn_like(output[..., value_slice])
        return output

    return attention.qkv.register_forward_hook(hook)


def test_memorial_attention_only_mixes_memory_content() -> None:
    torch.manual_seed(0)
    attention = DualAttention(dim=24, num_heads=3, qkv_bias=True).eval()
    tokens, memory = torch.randn(2, 10, 24), torch.randn(2, 10, 24)
    local, memorial = attention(tokens, memory)

    handle = _perturb_first_value_projection(attention)
    perturbed_local, perturbed_memorial = attention(tokens, memory)
    handle.remove()

    assert torch.allclose(memorial, perturbed_memorial, atol=1e-6)
    assert not torch.allclose(local, perturbed_local, atol=1e-3)
    # The memory does look at the image: changing the image's keys changes its output.
    assert not torch.allclose(memorial, attention(tokens + torch.randn_like(tokens), memory)[1], atol=1e-3)


def test_both_streams_share_block_weights() -> None:
    transformer = DualAttentionTransformer(channels=(4, 8, 16), patch_sizes=(4, 2, 1), grid_size=(2, 3), embed_dim=8)
    qkv_layers = [module for name, module in transformer.named_modules() if name.endswith("attn.qkv")]
    assert len(qkv_layers) == len(transformer.blocks) == 8
    assert transformer.memory.shape == (1, 6, 24)


@pytest.mark.parametrize("subnet", ["depthwise", "conv"])
def test_flow_is_invertible_and_its_log_determinant_is_exact(subnet: str) -> None:
    torch.manual_seed(0)
    flow = DiscriminativeFlow((2, 2, 2), flow_steps=4, subnet=subnet).double()
    # Give the couplings non-trivial scales and shifts (subnets start near zero otherwise).
    with torch.no_grad():
        for parameter in (parameter for parameter in flow.flow.parameters() if parameter.requires_grad):
            parameter.add_(0.3 * torch.randn_like(parameter))
    inputs = torch.randn(1, 6, 2, 2, dtype=torch.float64)

    latent, log_jacobian = flow.flow(inputs)
    reconstructed, _ = flow.flow(latent, rev=True)
    assert torch.allclose(reconstructed, inputs, atol=1e-10)

    jacobian = torch.autograd.functional.jacobian(lambda x: flow.flow(x.view(1, 6, 2, 2))[0].flatten(), inputs.flatten())
    _, numerical = torch.linalg.slogdet(jacobian)
    assert abs(log_jacobian.item()) > 0.1
    assert log_jacobian.item() == pytest.approx(numerical.item(), abs=1e-8)


@pytest.mark.parametrize(("subnet", "grouped"), [("depthwise", True), ("conv", False)])
def test_flow_subnets_are_depthwise_or_full_convolutions(subnet: str, grouped: bool) -> None:
    flow = DiscriminativeFlow((4, 8, 8), num_views=3, flow_steps=4, subnet=subnet, hidden_ratio=2)
    first_convs = [block.subnet[0] for block in flow.flow.module_list]
    assert [conv.kernel_size for conv in first_convs] == [(3, 3), (1, 1), (3, 3), (1, 1)]
    assert all((conv.groups == conv.in_channels) is grouped for conv in first_convs)
    assert all(conv.out_channels == 2 * conv.in_channels for conv in first_convs)


def test_without_positions_the_flow_is_anomalibs_fastflow_block() -> None:
    # Same seed, same parameters and keys: rows and checkpoints from before the option are the same flows.
    torch.manual_seed(0)
    ours = PositionalFlow((4, 6, 6), 4, lambda step: subnet_conv_func(1 if step % 2 else 3, 1.0))
    torch.manual_seed(0)
    anomalibs = create_fast_flow_block([4, 6, 6], conv3x3_only=False, hidden_ratio=1.0, flow_steps=4)
    assert ours.state_dict().keys() == anomalibs.state_dict().keys()
    assert all(torch.equal(ours.state_dict()[key], value) for key, value in anomalibs.state_dict().items())


def test_positions_make_the_same_feature_score_by_where_it_lies() -> None:
    torch.manual_seed(0)
    # 1 x 1 subnets, so that without positions nothing but the feature itself reaches a position's latent.
    plain = PositionalFlow((4, 5, 5), 2, lambda step: subnet_conv_func(1, 1.0)).eval()
    placed = PositionalFlow((4, 5, 5), 2, lambda step: subnet_conv_func(1, 1.0), position_channels=8).eval()
    for flow in (plain, placed):
        with torch.no_grad():
            for parameter in (parameter for parameter in flow.parameters() if parameter.requires_grad):
                parameter.add_(0.3 * torch.randn_like(parameter))
    uniform = torch.randn(1, 4, 1, 1).expand(2, 4, 5, 5)
    with torch.no_grad():
        plain_latent, _ = plain(uniform)
        placed_latent, _ = placed(uniform)
        recovered, _ = placed(placed_latent, rev=True)
    assert torch.allclose(plain_latent, plain_latent[..., :1, :1].expand_as(plain_latent), atol=1e-6)
    assert (placed_latent - placed_latent[..., :1, :1]).abs().amax() > 1e-2
    assert torch.allclose(recovered, uniform, atol=1e-5), "still invertible, given the same positions"
    assert placed.positions.shape == (1, 8, 5, 5)
    assert [block.subnet[0].in_channels for block in placed.module_list] == [2 + 8, 2 + 8]
    assert "positions" not in placed.state_dict(), "rebuilt from the shape, not saved"


def test_positional_flows_reach_every_scale_and_keep_their_log_determinant_per_position() -> None:
    torch.manual_seed(0)
    model = DadfModel(input_size=(64, 64), backbone="resnet18", pre_trained=False, embed_dim=8, depth=1, num_heads=2,
                      flow_steps=2, flow_inputs=["prior"], flow_positions=4).eval()
    priors = model.extract_priors(torch.rand(2, 3, 64, 64))
    with torch.no_grad():
        _, per_image = model.flow(priors)
        _, per_position = model.flow(priors, per_position=True)
    assert [flow.flow.positions.shape[1:] for flow in model.flows] == [(4, 16, 16), (4, 8, 8), (4, 4, 4)]
    assert all(torch.allclose(whole, parts.sum(dim=(1, 2)), atol=1e-4)
               for whole, parts in zip(per_image, per_position, strict=True))


@pytest.mark.parametrize("channels", [-4, 6])
def test_a_positional_width_timm_cannot_encode_is_named(channels: int) -> None:
    with pytest.raises(ValueError, match=rf"flow_positions must be 0 .* or a positive multiple of 4.*got {channels}"):
        DadfModel(input_size=(64, 64), backbone="resnet18", pre_trained=False, flow_positions=channels)


def test_unknown_flow_subnet_is_named() -> None:
    with pytest.raises(ValueError, match="Unknown flow subnet 'resnet': choose one of"):
        DiscriminativeFlow((4, 8, 8), subnet="resnet")


@pytest.mark.parametrize(
    ("flow_inputs", "views"),
    [(["prior"], 1), (["prior", "local"], 2), (["prior", "global"], 2), (["prior", "local", "global"], 3)],
)
def test_flow_inputs_select_the_views_the_flows_see(flow_inputs: list[str], views: int) -> None:
    model = DadfModel(
        input_size=(64, 64), backbone="resnet18", pre_trained=False, embed_dim=8, depth=1, num_heads=2,
        flow_steps=2, flow_inputs=flow_inputs,
    ).eval()
    priors = model.extract_priors(torch.rand(2, 3, 64, 64))
    local, global_ = model.reconstruct(priors)
    latents, _ = model.discriminate(priors, local, global_)
    assert [latent.shape[1] for latent in latents] == [views * prior.shape[1] for prior in priors]
    # The prior-only flow ignores the reconstructions entirely.
    if flow_inputs == ["prior"]:
        zeros = [torch.zeros_like(map_) for map_ in local]
        assert all(torch.equal(a, b) for a, b in zip(latents, model.discriminate(priors, zeros, zeros)[0], strict=True))


@pytest.mark.parametrize("flow_inputs", [[], ["local", "prior"], ["prior", "prior"], ["prior", "texture"]])
def test_bad_flow_inputs_are_named(flow_inputs: list[str]) -> None:
    with pytest.raises(ValueError, match="flow_inputs must be a non-empty subset"):
        DadfModel(input_size=(64, 64), backbone="resnet18", pre_trained=False, flow_inputs=flow_inputs)


def test_the_log_likelihood_map_lets_one_scale_dominate_where_probability_saturates() -> None:
    normal, faint, strong = torch.ones(1, 4, 8, 8), torch.full((1, 4, 4, 4), 2.0), torch.full((1, 4, 4, 4), 6.0)
    probability, log_likelihood = AnomalyMapGenerator((8, 8)), AnomalyMapGenerator((8, 8), kind="log_likelihood")
    # Negative log-likelihood 0.5 * mean(z^2) per scale, averaged over the scales.
    assert torch.allclose(log_likelihood([normal, strong]), torch.full((1, 1, 8, 8), (0.5 + 18.0) / 2))
    assert torch.allclose(probability([normal, strong]), probability([normal, strong * 10]), atol=1e-6), "saturated"
    assert log_likelihood([normal, strong * 10]).amax() > 10 * log_likelihood([normal, strong]).amax()
    # Both keep the order of unsaturated evidence.
    assert probability([normal, faint]).amax() < probability([normal, strong]).amax()


def same_flows_two_maps(anomaly_map: str, **scoring: object) -> tuple[DadfModel, DadfModel]:
    """A tiny flow-on-prior model with the paper's map, and one with ``anomaly_map`` (and ``scoring``) and the same weights."""
    arguments = {"input_size": (64, 64), "backbone": "resnet18", "pre_trained": False, "embed_dim": 8, "depth": 1,
                 "num_heads": 2, "flow_steps": 2, "flow_inputs": ["prior"]}
    torch.manual_seed(0)
    paper = DadfModel(**arguments).eval()
    other = DadfModel(**arguments, anomaly_map=anomaly_map, **scoring).eval()
    other.load_state_dict({**other.state_dict(), **paper.state_dict()})  # keeps what only ``other`` has (a blur)
    return paper, other


def test_the_model_scores_with_the_map_it_was_given() -> None:
    paper, log_likelihood = same_flows_two_maps("log_likelihood")
    images = torch.rand(2, 3, 64, 64)
    probability_map, log_likelihood_map = paper(images).anomaly_map, log_likelihood(images).anomaly_map
    assert probability_map.max() <= 0 < log_likelihood_map.min()
    assert torch.equal(log_likelihood(images).pred_score, log_likelihood_map.amax(dim=(-2, -1)))
    with pytest.raises(ValueError, match="Unknown anomaly map 'energy': choose one of"):
        same_flows_two_maps("energy")


def test_the_map_and_the_score_can_come_from_their_own_layers() -> None:
    torch.manual_seed(0)
    model = DadfModel(input_size=(64, 64), backbone="resnet18", layers=("layer1", "layer2", "layer3", "layer4"),
                      pre_trained=False, embed_dim=8, depth=1, num_heads=2, flow_steps=2, flow_inputs=["prior"],
                      map_layers=["layer1", "layer2", "layer3"], score_layers=["layer4", "layer2", "layer3"]).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        latents, _ = model.flow(model.extract_priors(images))
        output = model(images)
    every_scale = AnomalyMapGenerator((64, 64))
    assert torch.equal(output.anomaly_map, every_scale(latents[:3]))
    assert torch.equal(output.pred_score, every_scale(latents[1:]).amax(dim=(-2, -1)))
    assert not torch.equal(output.pred_score, output.anomaly_map.amax(dim=(-2, -1))), "the score is not the map's"


def paper_and_scored_outputs(**scoring: object) -> tuple[InferenceBatch, InferenceBatch]:
    """The outputs on two random images of a tiny model scored with ``scoring`` and of the paper's, same weights; same maps."""
    paper, scored = same_flows_two_maps("probability", **scoring)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        output, paper_output = scored(images), paper(images)
    assert torch.equal(output.anomaly_map, paper_output.anomaly_map), "the map is the paper's"
    return output, paper_output


def test_the_score_can_be_the_mean_of_the_maps_top_share() -> None:
    output, paper_output = paper_and_scored_outputs(score_top_fraction=0.1)
    highest = output.anomaly_map.flatten(start_dim=-2).sort(dim=-1, descending=True).values[..., :410]  # 10 % of 4096
    assert torch.allclose(output.pred_score, highest.mean(dim=-1))
    assert (output.pred_score < paper_output.pred_score).all(), "below the maximum"
    for fraction in (0.0, 1.5):
        with pytest.raises(ValueError, match=rf"score_top_fraction must be in \(0, 1\].*got {fraction}"):
            DadfModel(input_size=(64, 64), backbone="resnet18", pre_trained=False, score_top_fraction=fraction)


def test_the_score_can_leave_out_the_maps_border_band() -> None:
    output, _ = paper_and_scored_outputs(score_margin=0.125)  # the map keeps the band
    assert torch.equal(output.pred_score, output.anomaly_map[..., 8:56, 8:56].amax(dim=(-2, -1))), "8 of 64 rows a side"
    peak = torch.zeros(1, 1, 10, 10)
    peak[..., 0, 5] = 4.0  # in the top band only
    generator = AnomalyMapGenerator((10, 10), kind="log_likelihood", score_margin=0.1, score_top_fraction=1.0)
    assert generator.score([peak]).pred_score.item() == 0.0, "the top share is taken of the 8 x 8 positions inside"
    for margin in (-0.1, 0.5, 0.45):  # 0.45 of 8 rows rounds to 4 a side: none left inside
        with pytest.raises(ValueError, match=rf"score_margin must be in \[0, 0.5\).*got {margin}"):
            AnomalyMapGenerator((8, 8), score_margin=margin)


def test_a_blurred_map_scores_a_raised_neighbourhood_above_a_lone_position_of_its_height() -> None:
    lone, patch = torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 32)  # at the map's size: no upsampling
    lone[..., 16, 16] = 4.0
    patch[..., 15:18, 15:18] = 4.0
    latents = [torch.cat([lone, patch])]
    sharp = AnomalyMapGenerator((32, 32), kind="log_likelihood").score(latents)
    blurred = AnomalyMapGenerator((32, 32), kind="log_likelihood", sigma=4.0).score(latents)
    assert sharp.pred_score[0] == sharp.pred_score[1], "unblurred, both peak at 0.5 * 4^2"
    assert blurred.pred_score[1] > 2 * blurred.pred_score[0], "blurred, the raised neighbourhood stands out"
    assert blurred.anomaly_map.shape == sharp.anomaly_map.shape
    assert not AnomalyMapGenerator((32, 32)).state_dict(), "no blur adds nothing, so older checkpoints load"


def test_the_model_blurs_the_map_it_scores_with_anomalibs_filter() -> None:
    paper, blurred = same_flows_two_maps("probability", map_sigma=4.0)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        output, paper_output = blurred(images), paper(images)
    expected = GaussianBlur2d(sigma=4.0, channels=1)(paper_output.anomaly_map)
    assert torch.allclose(output.anomaly_map, expected)
    assert torch.equal(output.pred_score, output.anomaly_map.amax(dim=(-2, -1)))
    with pytest.raises(ValueError, match=r"blur sigma must be 0 \(no blur\) or positive, got -1"):
        DadfModel(input_size=(64, 64), backbone="resnet18", pre_trained=False, map_sigma=-1.0)
    with pytest.raises(ValueError, match=r"blur sigma 16.0 needs a 129-pixel kernel, too wide for the \(64, 64\) map"):
        DadfModel(input_size=(64, 64), backbone="resnet18", pre_trained=False, map_sigma=16.0)


def test_neighbourhood_pooling_averages_the_neighbours_each_position_has() -> None:
    features = torch.arange(16.0).reshape(1, 1, 4, 4)
    pooled = neighbourhood_pooling(3)(features)
    assert pooled.shape == features.shape, "the grid stays"
    assert pooled[0, 0, 1, 1] == features[0, 0, :3, :3].mean(), "an interior position: its 3 x 3 neighbourhood"
    assert pooled[0, 0, 0, 0] == features[0, 0, :2, :2].mean(), "a corner: its four, not nine with zero padding"
    assert torch.equal(neighbourhood_pooling(1)(features), features)
    for size in (0, 2, -3):
        with pytest.raises(ValueError, match=rf"prior_pooling must be a positive odd neighbourhood width.*got {size}"):
            neighbourhood_pooling(size)


def test_the_flows_and_the_transformer_see_the_pooled_prior() -> None:
    torch.manual_seed(0)
    model = DadfModel(input_size=(64, 64), backbone="resnet18", pre_trained=False, embed_dim=8, depth=1, num_heads=2,
                      flow_steps=2, prior_pooling=3).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        raw = list(model.feature_extractor(images).values())
        priors = model.extract_priors(images)
    pool = neighbourhood_pooling(3)
    assert all(torch.equal(prior, pool(feature)) for prior, feature in zip(priors, raw, strict=True))
    assert not torch.equal(priors[0], raw[0])
    with pytest.raises(ValueError, match="prior_pooling must be a positive odd"):
        DadfModel(input_size=(64, 64), backbone="resnet18", pre_trained=False, prior_pooling=2)


@pytest.mark.parametrize("argument", ["map_layers", "score_layers"])
@pytest.mark.parametrize("chosen", [[], ["layer4"], ["layer1", "layer1"]])
def test_map_and_score_layers_outside_the_layers_are_named(argument: str, chosen: list[str]) -> None:
    with pytest.raises(ValueError, match=rf"{argument} must be a non-empty subset of the model's scales \['layer1'"):
        DadfModel(input_size=(64, 64), backbone="resnet18", pre_trained=False, **{argument: chosen})


def perturbed_flow(subnet: str = "conv") -> DiscriminativeFlow:
    """A flow whose couplings and global scales are far from their initial (near-identity) values."""
    torch.manual_seed(0)
    flow = DiscriminativeFlow((2, 3, 3), num_views=2, flow_steps=4, subnet=subnet)
    with torch.no_grad():
        for parameter in (parameter for parameter in flow.parameters() if parameter.requires_grad):  # not permutations
            parameter.add_(0.3 * torch.randn_like(parameter))
    return flow


@pytest.mark.parametrize("subnet", ["depthwise", "conv"])
def test_the_log_determinant_per_position_adds_up_to_the_flows(subnet: str) -> None:
    flow = perturbed_flow(subnet)
    inputs = torch.randn(2, 4, 3, 3)
    latent, log_jacobian = flow.flow(inputs)
    same_latent, log_jacobian_map = flow_with_log_jacobian_map(flow.flow, inputs)
    assert torch.equal(same_latent, latent)
    assert log_jacobian_map.shape == (2, 3, 3)
    assert log_jacobian_map.std() > 0.05, "positions differ"
    assert torch.allclose(log_jacobian_map.sum(dim=(1, 2)), log_jacobian, atol=1e-4)
    assert all(not block.subnet._forward_hooks for block in flow.flow.module_list), "hooks removed"


def test_the_log_determinant_of_one_position_is_that_positions_own() -> None:
    # With only the centre taps of the subnets' kernels a position's latent depends on that position alone,
    # so the determinant of its own Jacobian block is what the map must give there.
    flow = perturbed_flow()
    with torch.no_grad():
        for conv in (module for module in flow.flow.modules() if isinstance(module, torch.nn.Conv2d)):
            centre = conv.weight[..., conv.kernel_size[0] // 2, conv.kernel_size[1] // 2].clone()
            conv.weight.zero_()[..., conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] = centre
    flow = flow.double()
    inputs = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    _, log_jacobian_map = flow_with_log_jacobian_map(flow.flow, inputs)

    def centre_latent(centre: torch.Tensor) -> torch.Tensor:
        features = inputs.clone()
        features[0, :, 1, 1] = centre
        return flow.flow(features)[0][0, :, 1, 1]

    _, numerical = torch.linalg.slogdet(torch.autograd.functional.jacobian(centre_latent, inputs[0, :, 1, 1]))
    assert log_jacobian_map[0, 1, 1].item() == pytest.approx(numerical.item(), abs=1e-8)


def test_the_density_map_counts_the_jacobian_the_other_maps_leave_out() -> None:
    paper, density = same_flows_two_maps("density")
    with torch.no_grad():
        for parameter in (parameter for parameter in paper.flows.parameters() if parameter.requires_grad):
            parameter.add_(0.3 * torch.randn_like(parameter))
    density.load_state_dict(paper.state_dict())
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        latents, log_jacobians = density.flow(density.extract_priors(images), per_position=True)
        density_map = density(images).anomaly_map
        probability_map = paper(images).anomaly_map
    exact = with_norm_log_jacobians(log_jacobians, density.flow_norms)
    # Per scale -exp(log p / C) with log p = -0.5 * sum(z^2) + log|det J| at each position.
    scale_maps = [
        torch.nn.functional.interpolate(
            -torch.exp((-0.5 * (latent**2).sum(dim=1, keepdim=True) + jacobian.unsqueeze(1)) / latent.shape[1]),
            size=(64, 64),
            mode="bilinear",
        )
        for latent, jacobian in zip(latents, exact, strict=True)
    ]
    expected = torch.stack(scale_maps, dim=-1).mean(dim=-1)
    assert torch.allclose(density_map, expected, atol=1e-5)
    assert not torch.allclose(density_map, probability_map, atol=1e-3)
    with pytest.raises(ValueError, match="needs the flows' log-determinant per position"):
        AnomalyMapGenerator((8, 8), kind="density")(latents)
