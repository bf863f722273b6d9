"""A dependency-free PNG scatter plot (numpy + zlib): panels of (x, y) points coloured by series.

No text is drawn: the caller writes the legend (series -> colour, axis ranges) into its JSON.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194),
          (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def write_png(path, img: np.ndarray) -> None:
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[r].astype(np.uint8).tobytes() for r in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def scatter(path, panels, size=(420, 320), margin=30) -> list:
    """panels: list of lists of (x, y, series_index, hollow). Returns each panel's (xmin, xmax, ymin, ymax)."""
    W, H = size
    img = np.full((H, W * len(panels), 3), 255, np.uint8)
    ranges = []
    for p, pts in enumerate(panels):
        x0 = p * W
        img[H - margin, x0 + margin : x0 + W - 10] = 0  # axes
        img[10 : H - margin, x0 + margin] = 0
        xs, ys = np.array([q[0] for q in pts], float), np.array([q[1] for q in pts], float)
        lo_x, hi_x = xs.min(), xs.max()
        lo_y, hi_y = ys.min(), ys.max()
        pad_x, pad_y = 0.05 * (hi_x - lo_x or 1), 0.05 * (hi_y - lo_y or 1)
        lo_x, hi_x, lo_y, hi_y = lo_x - pad_x, hi_x + pad_x, lo_y - pad_y, hi_y + pad_y
        ranges.append((lo_x, hi_x, lo_y, hi_y))
        for x, y, s, hollow in pts:
            cx = int(x0 + margin + (x - lo_x) / (hi_x - lo_x) * (W - margin - 20))
            cy = int(H - margin - (y - lo_y) / (hi_y - lo_y) * (H - margin - 20))
            c = COLORS[s % len(COLORS)]
            img[cy - 4 : cy + 5, cx - 4 : cx + 5] = c
            if hollow:
                img[cy - 2 : cy + 3, cx - 2 : cx + 3] = 255
    write_png(path, img)
    return ranges
