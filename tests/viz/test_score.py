"""The score's definitions on hand-built maps: boxes with exclusive ends, the pointing game with conservative ties,
mass in box computed exactly, chance, and the bilinear upsampling the maps go through first."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cbam.viz.score import (
    SCORE_COLUMNS,
    box_fractions,
    box_masks,
    mass_in_box,
    pointing_hits,
    score_rows_table,
    summarise,
    upsample,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def _map(height: int, width: int, points: dict[tuple[int, int], float], base: float = 0.0) -> torch.Tensor:
    """One map (1 x H x W) of ``base`` with the given (row, column) values."""
    m = torch.full((1, height, width), base)
    for (row, col), value in points.items():
        m[0, row, col] = value
    return m


def test_box_masks_take_pixel_centres_and_exclusive_ends():
    mask = box_masks([[1, 2, 3, 4]], 5, 6)[0]  # columns 1-2, rows 2-3
    expected = torch.zeros(5, 6, dtype=torch.bool)
    expected[2:4, 1:3] = True
    assert torch.equal(mask, expected)
    # a fractional box holds the pixels whose centres (i + 0.5) it holds: x in [0.6, 2) -> column 1 only
    assert box_masks([[0.6, 0, 2, 1]], 2, 4)[0].nonzero().tolist() == [[0, 1]]


def test_pointing_game_hit_and_miss():
    boxes = [[1, 1, 3, 3]]
    assert pointing_hits(_map(4, 4, {(2, 2): 1.0}, 0.1), boxes).tolist() == [True]
    assert pointing_hits(_map(4, 4, {(0, 3): 1.0}, 0.1), boxes).tolist() == [False]
    # batched: one hit, one miss
    maps = torch.cat([_map(4, 4, {(1, 1): 2.0}), _map(4, 4, {(3, 0): 2.0})])
    assert pointing_hits(maps, boxes * 2).tolist() == [True, False]


def test_pointing_game_ties_count_against_the_map():
    boxes = [[1, 1, 3, 3]]
    assert pointing_hits(_map(4, 4, {(1, 1): 1.0, (2, 2): 1.0}), boxes).tolist() == [True]  # both maxima inside
    assert pointing_hits(_map(4, 4, {(1, 1): 1.0, (0, 0): 1.0}), boxes).tolist() == [False]  # one outside
    near = 1.0 - 1e-7  # float noise is a tie too
    assert pointing_hits(_map(4, 4, {(1, 1): 1.0, (0, 0): near}), boxes).tolist() == [False]
    assert pointing_hits(_map(4, 4, {(1, 1): 1.0, (0, 0): 0.99}), boxes).tolist() == [True]  # a real difference


def test_a_flat_map_misses_unless_the_box_is_the_whole_image():
    for value in (0.0, 0.5):
        flat = torch.full((1, 4, 4), value)
        assert pointing_hits(flat, [[0, 0, 3, 4]]).tolist() == [False]
        assert pointing_hits(flat, [[0, 0, 4, 4]]).tolist() == [True]


def test_mass_in_box_exactly():
    m = torch.arange(16, dtype=torch.float32).reshape(1, 4, 4)  # 0..15, total 120
    inside = 5 + 6 + 9 + 10  # rows 1-2, columns 1-2
    assert mass_in_box(m, [[1, 1, 3, 3]]).item() == pytest.approx(inside / 120)
    assert mass_in_box(torch.ones(1, 4, 4), [[0, 0, 2, 2]]).item() == pytest.approx(0.25)
    assert mass_in_box(_map(4, 4, {(0, 0): 3.0}), [[0, 0, 1, 1]]).item() == pytest.approx(1.0)
    assert mass_in_box(_map(4, 4, {(0, 0): 3.0}), [[1, 1, 4, 4]]).item() == 0.0


def test_an_all_zero_map_gets_what_a_flat_map_gets():
    box = [[0, 0, 2, 1]]
    assert mass_in_box(torch.zeros(1, 4, 4), box).item() == pytest.approx(2 / 16)
    assert mass_in_box(torch.full((1, 4, 4), 0.3), box).item() == pytest.approx(2 / 16)


def test_chance_is_the_box_area_fraction_and_what_a_uniform_map_gets():
    g = torch.Generator().manual_seed(0)
    x0, y0 = torch.randint(0, 20, (8,), generator=g), torch.randint(0, 20, (8,), generator=g)
    w, h = torch.randint(1, 12, (8,), generator=g), torch.randint(1, 12, (8,), generator=g)
    boxes = torch.stack([x0, y0, x0 + w, y0 + h], 1).float()
    chance = box_fractions(boxes, 32, 32)
    assert torch.allclose(chance, (w * h).float() / 1024)
    assert torch.allclose(mass_in_box(torch.ones(8, 32, 32), boxes), chance)


def test_upsampling_is_bilinear_with_half_pixel_centres():
    m = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    up = upsample(m, 4)
    assert up.shape == (1, 4, 4)
    assert torch.allclose(up[0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))
    assert torch.equal(up, upsample(m[:, None], (4, 4)))  # N x 1 x h x w works the same
    ref = F.interpolate(m[:, None], size=(4, 4), mode="bilinear", align_corners=False)[:, 0]
    assert torch.equal(up, ref)
    assert torch.equal(upsample(up, 4), up)  # same size: unchanged


def test_an_upsampled_peak_is_scored_where_it_lands():
    up = upsample(torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]), 4)  # the peak stays at pixel (0, 0) alone
    assert up[0, 0, 0] == up.max() and (up == up.max()).sum() == 1
    assert pointing_hits(up, [[0, 0, 1, 1]]).tolist() == [True]
    assert pointing_hits(up, [[1, 1, 4, 4]]).tolist() == [False]
    # upsampled 4x, the centre of a 3 x 3 map lands between pixels 5 and 6: a 2 x 2 plateau of ties, a hit only for
    # a box around all of it
    centre = upsample(_map(3, 3, {(1, 1): 1.0}), 12)
    assert (centre == centre.max()).nonzero()[:, 1:].tolist() == [[5, 5], [5, 6], [6, 5], [6, 6]]
    assert pointing_hits(centre, [[5, 5, 7, 7]]).tolist() == [True]
    assert pointing_hits(centre, [[5, 5, 6, 7]]).tolist() == [False]


@pytest.mark.parametrize(
    "maps, boxes, words",
    [
        (torch.full((1, 4, 4), -0.1), [[0, 0, 1, 1]], "non-negative"),
        (torch.full((1, 4, 4), float("nan")), [[0, 0, 1, 1]], "finite"),
        (torch.ones(2, 4, 4), [[0, 0, 1, 1]], "2 x 4"),
        (torch.ones(4, 4), [[0, 0, 1, 1]], "N x h x w"),
    ],
)
def test_bad_maps_and_boxes_are_one_line_value_errors(maps, boxes, words):
    for fn in (pointing_hits, mass_in_box):
        with pytest.raises(ValueError, match=words) as info:
            fn(maps, boxes)
        assert "\n" not in str(info.value)


def test_summary_and_table():
    row = summarise("spatial layer1", "net/cbam", torch.tensor([True, False, True, True]),
                    torch.tensor([0.5, 0.25, 0.5, 0.75]), torch.tensor([0.1, 0.2, 0.3, 0.4]))
    assert (row.pointing_game, row.mass_in_box, row.chance, row.images) == (75.0, 50.0, pytest.approx(25.0), 4)
    table = score_rows_table([row]).splitlines()
    assert all(c in table[0] for c in SCORE_COLUMNS)
    assert table[2].split()[-4:] == ["75.0", "50.0", "25.0", "4"]
    with pytest.raises(ValueError, match="same non-zero number"):
        summarise("m", "n", torch.tensor([True]), torch.tensor([0.5, 0.5]), torch.tensor([0.1]))
