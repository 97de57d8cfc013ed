"""Losses against direct, slow re-computations (python loops, float64), gradients included."""

from __future__ import annotations

import math

import pytest
import torch

from polyp_ssl.losses import (
    LOSS_TYPES,
    HierarchicalContrastive,
    HierarchicalMILNCE,
    mil_nce,
    parse_milnce_weights,
    same_group,
    supcon,
    temporally_aware,
)

TAU = 0.2


def _unit_rows(z: torch.Tensor) -> list[list[float]]:
    rows = []
    for row in z.tolist():
        norm = math.sqrt(sum(x * x for x in row))
        rows.append([x / norm for x in row])
    return rows


def _sims(z: torch.Tensor, tau: float) -> list[list[float]]:
    u = _unit_rows(z)
    return [[sum(a * b for a, b in zip(ui, uj, strict=True)) / tau for uj in u] for ui in u]


def _log_sum_exp(values: list[float]) -> float:
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def slow_mil_nce(z: torch.Tensor, pos: list[list[bool]], tau: float) -> float:
    s = _sims(z, tau)
    n = len(s)
    total = 0.0
    for i in range(n):
        denom = _log_sum_exp([s[i][j] for j in range(n) if j != i])
        numer = _log_sum_exp([s[i][j] for j in range(n) if j != i and pos[i][j]])
        total += denom - numer
    return total / n


def slow_soft_ce(z: torch.Tensor, weights: list[list[float]], tau: float) -> float:
    s = _sims(z, tau)
    n = len(s)
    total = 0.0
    for i in range(n):
        denom = sum(math.exp(s[i][j]) for j in range(n) if j != i)
        norm = sum(weights[i][j] for j in range(n) if j != i)
        for j in range(n):
            if j != i and weights[i][j] > 0:
                total -= weights[i][j] / norm * math.log(math.exp(s[i][j]) / denom)
    return total / n


def _groups(ids: list[int]) -> list[list[bool]]:
    return [[a == b and i != j for j, b in enumerate(ids)] for i, a in enumerate(ids)]


def _ta_weights(t: list[float], v: list[int], lam: float) -> list[list[float]]:
    return [
        [math.exp(-lam * abs(t[i] - t[j])) if v[i] == v[j] and i != j else 0.0 for j in range(len(t))]
        for i in range(len(t))
    ]


def _numeric_grad(f, z: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Central differences of a python-float function of z."""
    g = torch.zeros_like(z, dtype=torch.float64)
    for idx in range(z.numel()):
        zp, zm = z.clone().double(), z.clone().double()
        zp.view(-1)[idx] += eps
        zm.view(-1)[idx] -= eps
        g.view(-1)[idx] = (f(zp) - f(zm)) / (2 * eps)
    return g


BAGS = [0, 0, 1, 1, 1, 2, 2]


@pytest.fixture
def z() -> torch.Tensor:
    return torch.randn(len(BAGS), 5, generator=torch.Generator().manual_seed(0))


def test_mil_nce_matches_slow_value_and_gradient(z: torch.Tensor) -> None:
    pos = _groups(BAGS)
    zz = z.clone().requires_grad_(True)
    loss = mil_nce(zz, same_group(torch.tensor(BAGS)), TAU)
    loss.backward()
    assert loss.item() == pytest.approx(slow_mil_nce(z, pos, TAU), rel=1e-5)
    num = _numeric_grad(lambda x: slow_mil_nce(x, pos, TAU), z)
    torch.testing.assert_close(zz.grad.double(), num, rtol=1e-3, atol=1e-4)


def test_supervised_matches_slow_value_and_gradient(z: torch.Tensor) -> None:
    w = [[float(p) for p in row] for row in _groups(BAGS)]
    zz = z.clone().requires_grad_(True)
    loss = supcon(zz, same_group(torch.tensor(BAGS)), TAU)
    loss.backward()
    assert loss.item() == pytest.approx(slow_soft_ce(z, w, TAU), rel=1e-5)
    num = _numeric_grad(lambda x: slow_soft_ce(x, w, TAU), z)
    torch.testing.assert_close(zz.grad.double(), num, rtol=1e-3, atol=1e-4)


def test_temporally_aware_matches_slow_value_and_gradient(z: torch.Tensor) -> None:
    t = [0.1, 0.15, 0.5, 0.9, 0.05, 0.3, 0.31]
    v = [0, 0, 0, 0, 1, 1, 1]
    w = _ta_weights(t, v, 3.0)
    zz = z.clone().requires_grad_(True)
    loss = temporally_aware(zz, torch.tensor(t), torch.tensor(v), TAU, 3.0)
    loss.backward()
    assert loss.item() == pytest.approx(slow_soft_ce(z, w, TAU), rel=1e-5)
    num = _numeric_grad(lambda x: slow_soft_ce(x, w, TAU), z)
    torch.testing.assert_close(zz.grad.double(), num, rtol=1e-3, atol=1e-4)


def test_gradcheck_float64() -> None:
    z = torch.randn(5, 3, dtype=torch.float64, requires_grad=True, generator=torch.Generator().manual_seed(1))
    bags = torch.tensor([0, 0, 1, 1, 1])
    assert torch.autograd.gradcheck(lambda x: mil_nce(x, same_group(bags), TAU), (z,))
    assert torch.autograd.gradcheck(lambda x: supcon(x, same_group(bags), TAU), (z,))
    t, v = torch.tensor([0.0, 0.2, 0.3, 0.7, 1.0]), torch.tensor([0, 0, 0, 1, 1])
    assert torch.autograd.gradcheck(lambda x: temporally_aware(x, t, v, TAU, 2.0), (z,))
    frames = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    loss = HierarchicalMILNCE((1.0, 0.5, 0.25), TAU)
    frag = z[:4].detach().requires_grad_()
    bags4 = torch.tensor([0, 0, 1, 1])
    assert torch.autograd.gradcheck(lambda f, fr: loss(f, bags4, fr)["loss"], (frag, frames))


def test_hierarchical_terms_match_slow() -> None:
    g = torch.Generator().manual_seed(2)
    bag = [0, 0, 1, 1, 2, 2]
    b, s, d = len(bag), 3, 4
    frag = torch.randn(b, d, generator=g)
    frames = torch.randn(b, s, d, generator=g)
    out = HierarchicalMILNCE((1.0, 0.7, 0.3), TAU)(frag, torch.tensor(bag), frames)
    flat = frames.reshape(b * s, d)
    frame_bag = [bag[k // s] for k in range(b * s)]
    frame_frag = [k // s for k in range(b * s)]
    want_frag = slow_mil_nce(frag, _groups(bag), TAU)
    want_cross = slow_mil_nce(flat, _groups(frame_bag), TAU)
    want_intra = slow_mil_nce(flat, _groups(frame_frag), TAU)
    assert out["loss_frag"].item() == pytest.approx(want_frag, rel=1e-5)
    assert out["loss_cross_frame"].item() == pytest.approx(want_cross, rel=1e-5)
    assert out["loss_intra_frame"].item() == pytest.approx(want_intra, rel=1e-5)
    assert out["loss"].item() == pytest.approx(want_frag + 0.7 * want_cross + 0.3 * want_intra, rel=1e-5)


def test_hierarchical_weights_and_frame_mask() -> None:
    assert parse_milnce_weights([1.0]) == (1.0, 0.0, 0.0)
    assert parse_milnce_weights([1.0, 2.0]) == (1.0, 2.0, 0.0)
    for bad in ([], [1, 1, 1, 1], [0, 0], [-1, 1]):
        with pytest.raises(ValueError, match="loss_milnce_weights"):
            parse_milnce_weights(bad)
    one = HierarchicalMILNCE([1.0], TAU)(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]))
    assert set(one) == {"loss", "loss_frag"}
    # a masked frame is left out: same value as dropping it by hand
    g = torch.Generator().manual_seed(3)
    frag, frames = torch.randn(4, 3, generator=g), torch.randn(4, 3, 3, generator=g)
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[1, 2] = False
    out = HierarchicalMILNCE((0.0, 1.0), TAU)(frag, torch.tensor([0, 0, 1, 1]), frames, mask)
    keep = mask.reshape(-1)
    frame_bag = torch.tensor([0, 0, 1, 1]).repeat_interleave(3)[keep]
    want = mil_nce(frames.reshape(12, 3)[keep], same_group(frame_bag), TAU)
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-6)


def test_permutation_invariance(z: torch.Tensor) -> None:
    bags = torch.tensor(BAGS)
    perm = torch.randperm(len(BAGS), generator=torch.Generator().manual_seed(4))
    t = torch.linspace(0, 1, len(BAGS))
    v = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    for f in (
        lambda zz, bb, tt, vv: mil_nce(zz, same_group(bb), TAU),
        lambda zz, bb, tt, vv: supcon(zz, same_group(bb), TAU),
        lambda zz, bb, tt, vv: temporally_aware(zz, tt, vv, TAU, 5.0),
    ):
        permuted = f(z[perm], bags[perm], t[perm], v[perm]).item()
        assert f(z, bags, t, v).item() == pytest.approx(permuted, rel=1e-6)
    # relabelling the bags does not matter either
    assert mil_nce(z, same_group(bags), TAU).item() == pytest.approx(
        mil_nce(z, same_group(bags * 7 + 3), TAU).item(), rel=1e-6
    )


def test_noisy_bag_member_costs_mil_nce_less_than_supervised() -> None:
    """Bag 0: anchor + 3 true positives (near the anchor) + 1 member; other bags are negatives.
    Turning that member into noise (another polyp, far away) raises the anchor's supervised loss
    much more than its MIL-NCE loss."""
    d = 8
    e = torch.eye(d)
    anchor = e[0]
    clean_member = e[0] + 0.1 * e[1]
    noisy_member = e[5]  # orthogonal to the bag
    true_pos = [e[0] + 0.1 * e[2], e[0] + 0.1 * e[3], e[0] + 0.1 * e[4]]
    negatives = [e[6], e[6] + 0.1 * e[1], e[7], e[7] + 0.1 * e[2]]
    bags = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2, 2])

    def batch(member: torch.Tensor) -> torch.Tensor:
        return torch.stack([anchor, *true_pos, member, *negatives])

    pos = same_group(bags)
    clean_mil, noisy_mil = mil_nce(batch(clean_member), pos, TAU), mil_nce(batch(noisy_member), pos, TAU)
    clean_sup, noisy_sup = supcon(batch(clean_member), pos, TAU), supcon(batch(noisy_member), pos, TAU)
    mil_increase = (noisy_mil - clean_mil).item()
    sup_increase = (noisy_sup - clean_sup).item()
    assert mil_increase > 0 and sup_increase > 0
    print(f"noisy member: MIL-NCE +{mil_increase:.4f}, supervised +{sup_increase:.4f}")
    assert mil_increase < 0.25 * sup_increase


def test_rows_without_positive_raise() -> None:
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="no candidate positive"):
        mil_nce(z, same_group(torch.tensor([0, 0, 1, 2])), TAU)
    with pytest.raises(ValueError, match="no positive target weight"):
        supcon(z, same_group(torch.tensor([0, 1, 2, 3])), TAU)
    with pytest.raises(ValueError, match="no positive target weight"):
        temporally_aware(z, torch.rand(4), torch.tensor([0, 0, 0, 1]), TAU, 10.0)
    with pytest.raises(ValueError, match="no candidate positive"):  # one frame per fragment: no term 3
        HierarchicalMILNCE((0, 0, 1), TAU)(z, torch.tensor([0, 0, 1, 1]), torch.randn(4, 1, 3))


def test_stable_for_small_temperature_and_bf16_autocast() -> None:
    z = torch.randn(6, 4, generator=torch.Generator().manual_seed(5))
    bags = same_group(torch.tensor([0, 0, 1, 1, 2, 2]))
    tiny = mil_nce(z, bags, 1e-4)
    assert torch.isfinite(tiny)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zb = torch.nn.functional.linear(z, torch.eye(4))  # bf16 under autocast
        assert zb.dtype == torch.bfloat16
        loss = mil_nce(zb, bags, TAU)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(mil_nce(zb.float(), bags, TAU).item(), rel=1e-6)


# -- every loss type at the three levels ---------------------------------------------------------


def slow_soft_ce_skipping(
    z: torch.Tensor, weights: list[list[float]], skip: list[list[bool]], tau: float
) -> float:
    """SupCon-style cross-entropy with pairs `skip[i][j]` left out of the softmax and the targets."""
    s = _sims(z, tau)
    n = len(s)
    total = 0.0
    for i in range(n):
        others = [j for j in range(n) if j != i and not skip[i][j]]
        denom = sum(math.exp(s[i][j]) for j in others)
        norm = sum(weights[i][j] for j in others)
        for j in others:
            if weights[i][j] > 0:
                total -= weights[i][j] / norm * (s[i][j] - math.log(denom))
    return total / n


def _slow_hierarchical(
    loss_type: str,
    frag: torch.Tensor,
    frames: torch.Tensor,
    bag: list[int],
    t: list[float],
    v: list[int],
    weights: tuple[float, float, float],
    lam: float,
    mask_intra: bool,
) -> float:
    """The weighted three-level loss, item by item: frames take their fragment's bag, position, video."""
    b, s = frames.shape[:2]
    flat = frames.reshape(b * s, -1)
    f_of = [k // s for k in range(b * s)]
    same_frag = [[f_of[i] == f_of[j] for j in range(b * s)] for i in range(b * s)]
    no_skip = [[False] * (b * s) for _ in range(b * s)]
    cross_skip = same_frag if mask_intra else no_skip
    if loss_type == "supervised":
        w1 = [[1.0 if bag[i] == bag[j] else 0.0 for j in range(b)] for i in range(b)]
        w2 = [[1.0 if bag[f_of[i]] == bag[f_of[j]] else 0.0 for j in range(b * s)] for i in range(b * s)]
    else:
        w1 = [
            [math.exp(-lam * abs(t[i] - t[j])) if v[i] == v[j] else 0.0 for j in range(b)] for i in range(b)
        ]
        w2 = [
            [
                math.exp(-lam * abs(t[f_of[i]] - t[f_of[j]])) if v[f_of[i]] == v[f_of[j]] else 0.0
                for j in range(b * s)
            ]
            for i in range(b * s)
        ]
    w3 = [[1.0 if same_frag[i][j] else 0.0 for j in range(b * s)] for i in range(b * s)]
    no_skip_b = [[False] * b for _ in range(b)]
    terms = (
        slow_soft_ce_skipping(frag, w1, no_skip_b, TAU),
        slow_soft_ce_skipping(flat, w2, cross_skip, TAU),
        slow_soft_ce_skipping(flat, w3, no_skip, TAU),
    )
    return sum(w * x for w, x in zip(weights, terms, strict=True))


HB_BAG = [0, 0, 1, 1, 2, 2]
HB_T = [0.1, 0.3, 0.32, 0.8, 0.5, 0.55]
HB_V = [0, 0, 0, 0, 1, 1]


@pytest.mark.parametrize("loss_type", ["supervised", "temporally-aware"])
@pytest.mark.parametrize("mask_intra", [False, True])
def test_hierarchical_supcon_and_temporally_aware_match_slow(loss_type: str, mask_intra: bool) -> None:
    g = torch.Generator().manual_seed(11)
    b, s, d, lam = len(HB_BAG), 3, 4, 2.5
    frag = torch.randn(b, d, generator=g, dtype=torch.float64)
    frames = torch.randn(b, s, d, generator=g, dtype=torch.float64)
    weights = (1.0, 0.7, 0.3)
    loss = HierarchicalContrastive(weights, TAU, mask_intra, loss_type, lam)
    bag, t, v = torch.tensor(HB_BAG), torch.tensor(HB_T, dtype=torch.float64), torch.tensor(HB_V)
    fz, frz = frag.clone().requires_grad_(), frames.clone().requires_grad_()
    out = loss(fz, bag, frz, position=t, video=v)
    assert set(out) == {"loss", "loss_frag", "loss_cross_frame", "loss_intra_frame"}
    want = _slow_hierarchical(loss_type, frag, frames, HB_BAG, HB_T, HB_V, weights, lam, mask_intra)
    assert out["loss"].item() == pytest.approx(want, rel=1e-9)
    for name, w in zip(("loss_frag", "loss_cross_frame", "loss_intra_frame"), weights, strict=True):
        alone = tuple(x if x is w else 0.0 for x in weights)
        one = _slow_hierarchical(loss_type, frag, frames, HB_BAG, HB_T, HB_V, alone, lam, mask_intra) / w
        assert out[name].item() == pytest.approx(one, rel=1e-9)
    # gradients against central differences of the slow loops
    out["loss"].backward()

    def slow_of(f: torch.Tensor, fr: torch.Tensor) -> float:
        return _slow_hierarchical(loss_type, f, fr, HB_BAG, HB_T, HB_V, weights, lam, mask_intra)

    torch.testing.assert_close(
        fz.grad, _numeric_grad(lambda x: slow_of(x, frames), frag), rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(
        frz.grad, _numeric_grad(lambda x: slow_of(frag, x), frames), rtol=1e-4, atol=1e-6
    )


def test_masking_same_fragment_frames_changes_supervised_cross_term() -> None:
    g = torch.Generator().manual_seed(12)
    frag, frames = torch.randn(6, 4, generator=g), torch.randn(6, 3, 4, generator=g)
    bag = torch.tensor(HB_BAG)
    plain = HierarchicalContrastive((0.0, 1.0), TAU, False, "supervised")(frag, bag, frames)["loss"]
    masked = HierarchicalContrastive((0.0, 1.0), TAU, True, "supervised")(frag, bag, frames)["loss"]
    assert abs(plain.item() - masked.item()) > 1e-3


def test_weights_one_zero_zero_reduce_to_the_fragment_level_loss() -> None:
    g = torch.Generator().manual_seed(13)
    frag, frames = torch.randn(6, 5, generator=g), torch.randn(6, 3, 5, generator=g)
    bag, t, v = torch.tensor(HB_BAG), torch.tensor(HB_T), torch.tensor(HB_V)
    direct = {
        "mil-nce": mil_nce(frag, same_group(bag), TAU),
        "supervised": supcon(frag, same_group(bag), TAU),
        "temporally-aware": temporally_aware(frag, t, v, TAU, 4.0),
    }
    assert set(direct) == set(LOSS_TYPES)
    for loss_type, want in direct.items():
        for weights in ([1.0], [1.0, 0.0], [1.0, 0.0, 0.0]):
            loss = HierarchicalContrastive(weights, TAU, False, loss_type, 4.0)
            assert not loss.needs_frames
            out = loss(frag, bag, frames, position=t, video=v)
            assert set(out) == {"loss", "loss_frag"}
            assert torch.equal(out["loss"], want), loss_type
        scaled = HierarchicalContrastive([2.5], TAU, False, loss_type, 4.0)(frag, bag, position=t, video=v)
        assert scaled["loss"].item() == pytest.approx(2.5 * want.item(), rel=1e-6)


def test_mil_nce_class_is_the_mil_nce_loss_type() -> None:
    g = torch.Generator().manual_seed(14)
    frag, frames = torch.randn(6, 4, generator=g), torch.randn(6, 3, 4, generator=g)
    bag = torch.tensor(HB_BAG)
    for mask in (False, True):
        a = HierarchicalMILNCE((1.0, 0.5, 0.2), TAU, mask)(frag, bag, frames)
        b = HierarchicalContrastive((1.0, 0.5, 0.2), TAU, mask, "mil-nce")(frag, bag, frames)
        assert all(torch.equal(a[k], b[k]) for k in a) and set(a) == set(b)


def test_loss_types_differ_and_need_their_inputs() -> None:
    g = torch.Generator().manual_seed(15)
    frag, frames = torch.randn(6, 4, generator=g), torch.randn(6, 3, 4, generator=g)
    bag, t, v = torch.tensor(HB_BAG), torch.tensor(HB_T), torch.tensor(HB_V)
    values = {
        lt: HierarchicalContrastive((1.0, 1.0), TAU, False, lt)(frag, bag, frames, position=t, video=v)[
            "loss"
        ]
        for lt in LOSS_TYPES
    }
    assert len({round(x.item(), 6) for x in values.values()}) == 3
    with pytest.raises(ValueError, match="positions and videos"):
        HierarchicalContrastive((1.0,), TAU, False, "temporally-aware")(frag, bag)
    with pytest.raises(ValueError, match="frame projections"):
        HierarchicalContrastive((1.0, 1.0), TAU, False, "supervised")(frag, bag)
    with pytest.raises(ValueError, match="unknown loss_type"):
        HierarchicalContrastive((1.0,), TAU, False, "triplet")


def test_loss_weights_flag_is_an_alias_of_loss_milnce_weights() -> None:
    from polyp_ssl.train_cli import build_parser

    parser = build_parser()
    assert vars(parser.parse_args(["--loss_weights", "1", "0", "0.5"])) == {
        "loss_milnce_weights": [1.0, 0.0, 0.5]
    }
    assert vars(parser.parse_args(["--loss_milnce_weights", "2"])) == {"loss_milnce_weights": [2.0]}
