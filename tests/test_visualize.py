import torch

from rclip_core.visualize import class_color, draw_detections, tile


def test_drawing_changes_pixels_only_on_the_box_outline():
    img = torch.zeros(3, 64, 64, dtype=torch.uint8)
    out = draw_detections(img, torch.tensor([[10.0, 10.0, 40.0, 50.0]]), ["cat"], torch.tensor([0.9]), width=1)
    assert out.shape == img.shape and out.dtype == torch.uint8
    assert out[:, 10, 10:41].sum() > 0 and out[:, 30, 10].sum() > 0  # top edge and left edge drawn
    assert out[:, 60:, :].sum() == 0  # far away from the box nothing changes
    assert img.sum() == 0  # the input is not modified


def test_no_boxes_and_colours_and_tiling():
    img = torch.full((3, 8, 8), 7, dtype=torch.uint8)
    assert torch.equal(draw_detections(img, torch.zeros(0, 4), []), img)
    assert class_color(0) != class_color(1)
    grid = tile([img, img, img], nrow=2, padding=1)
    assert grid.shape == (3, 1 + 2 * 9, 1 + 2 * 9)
