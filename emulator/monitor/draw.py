"""``virtio-emu monitor PATH map --png FILE``: each shared-memory region as a horizontal bar
with its mappings on it, drawn with Pillow from a ``query-mappings`` reply.

Pillow rather than matplotlib: one wheel with no dependencies of its own, and a picture of
rectangles and labels needs no plotting library. Only this module imports it, and only the
``map`` command imports this module.

The image is ``width`` x ``image_height(regions)`` pixels: a title line, one band of
``ROW`` pixels per region (its label, the bar, offsets under the bar's ends, one label per
mapping where there is room), then the legend. Read-write mappings are orange, read-only ones
blue, unmapped space light grey; a mapping narrower than two pixels still gets two.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

TOP = 40
ROW = 110
LEGEND = 30
MARGIN = 20
BAR_HEIGHT = 34
MIN_WIDTH = 300
#: Pixels a mapping gets however small it is, so every mapping shows.
MIN_MAPPING_WIDTH = 2
COLOURS = {
    "RW": (217, 130, 43),
    "RO": (47, 109, 181),
    "hole": (232, 232, 232),
    "outline": (85, 85, 85),
    "text": (32, 32, 32),
    "background": (255, 255, 255),
}

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def image_height(regions: int) -> int:
    """The picture's height for this many regions (an empty BAR still gets one band)."""
    return TOP + ROW * max(1, regions) + LEGEND


def human_size(size: int) -> str:
    """``4 MiB``, ``12 KiB``, ``1.5 GiB``, ``100 B``."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            value = size / (1 << shift)
            return f"{value:g} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{size} B"


def draw_map(regions: Sequence[dict[str, Any]], path: Path, *, width: int = 1000) -> None:
    """Write the PNG of ``regions`` (``query-mappings``' ``regions``) to ``path``."""
    width = max(width, MIN_WIDTH)
    image = Image.new("RGB", (width, image_height(len(regions))), COLOURS["background"])
    canvas = ImageDraw.Draw(image)
    font = _font(13)
    total = sum(len(region["mappings"]) for region in regions)
    title = f"shared memory: {len(regions)} region(s), {total} mapping(s)"
    canvas.text((MARGIN, 12), title, fill=COLOURS["text"], font=_font(15))
    if not regions:
        canvas.text((MARGIN, TOP + 10), "no shared memory", fill=COLOURS["text"], font=font)
    for index, region in enumerate(regions):
        _draw_region(canvas, font, region, TOP + index * ROW, width)
    _draw_legend(canvas, font, image.height - LEGEND + 6)
    image.save(path, format="PNG")


def _draw_region(
    canvas: ImageDraw.ImageDraw, font: Font, region: dict[str, Any], top: int, width: int
) -> None:
    size = int(region["size"])
    mappings = sorted(region["mappings"], key=lambda m: int(m["shm_offset"]))
    mapped = sum(int(m["length"]) for m in mappings)
    left, right = MARGIN, width - MARGIN
    span = right - left

    def x_of(offset: int) -> float:
        return left + span * offset / size

    bar_top, bar_bottom = top + 22, top + 22 + BAR_HEIGHT
    labels_y = bar_bottom + 20
    hidden = 0
    label_end = float("-inf")
    canvas.rectangle(
        (left, bar_top, right, bar_bottom), fill=COLOURS["hole"], outline=COLOURS["outline"]
    )
    for mapping in mappings:
        start, length = int(mapping["shm_offset"]), int(mapping["length"])
        x0 = round(x_of(start))
        x1 = max(x0 + MIN_MAPPING_WIDTH, round(x_of(start + length)))
        colour = COLOURS["RW" if mapping["access"] == "RW" else "RO"]
        canvas.rectangle((x0, bar_top + 1, x1 - 1, bar_bottom - 1), fill=colour)
        label = f"{start:#x} +{human_size(length)} {mapping['access']}"
        text_width = canvas.textlength(label, font=font)
        if x0 > label_end + 6 and x0 + 4 + text_width <= right:
            canvas.line((x0, labels_y - 4, x0, labels_y + 12), fill=colour, width=2)
            canvas.text((x0 + 4, labels_y - 2), label, fill=COLOURS["text"], font=font)
            label_end = x0 + 4 + text_width
        else:
            hidden += 1
    header = (
        f"shmid {region['shmid']}: {human_size(size)} ({size:#x}) at BAR offset "
        f"{int(region['bar_offset']):#x}, {len(mappings)} mapping(s), {human_size(mapped)} mapped"
    )
    if hidden:
        header += f" ({hidden} label(s) left out for room)"
    canvas.text((left, top + 2), header, fill=COLOURS["text"], font=font)
    canvas.text((left, bar_bottom + 2), "0x0", fill=COLOURS["outline"], font=font)
    end = f"{size:#x}"
    canvas.text(
        (right - canvas.textlength(end, font=font), bar_bottom + 2),
        end,
        fill=COLOURS["outline"],
        font=font,
    )


def _draw_legend(canvas: ImageDraw.ImageDraw, font: Font, y: int) -> None:
    x = MARGIN
    for key, text in (("RW", "read-write"), ("RO", "read-only"), ("hole", "unmapped")):
        canvas.rectangle((x, y, x + 14, y + 14), fill=COLOURS[key], outline=COLOURS["outline"])
        canvas.text((x + 20, y), text, fill=COLOURS["text"], font=font)
        x += 30 + int(canvas.textlength(text, font=font))


def _font(size: int) -> Font:
    """Pillow's own font (no font file needed); a bitmap font where FreeType is missing."""
    return ImageFont.load_default(size=size)
