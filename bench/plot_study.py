"""Draws the training-loss curves of a router study (docs/REPRODUCTION.md) with PIL alone.

  python bench/plot_study.py bench/records/2026-11-26_h200_study docs/images/study_loss.png

Reads the ``LOSS <run> <step> <loss> <img/s>`` lines of every ``log_<run>.txt`` in the folder.
"""

import glob
import os
import sys

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
WIDTH, HEIGHT, MARGIN = 640, 360, 50


def read_curves(folder):
  curves = {}
  for path in sorted(glob.glob(os.path.join(folder, "log_*.txt"))):
    with open(path, encoding="utf-8") as f:
      for line in f:
        parts = line.split()
        if parts and parts[0] == "LOSS":
          curves.setdefault(parts[1], []).append((int(parts[2]), float(parts[3])))
  return curves


def plot(curves, out, skip_first=1):
  # The first log windows hold the warmup's large losses, which would flatten the rest.
  points = {name: sorted(values)[skip_first:] for name, values in curves.items()}
  steps = [s for values in points.values() for s, _ in values]
  losses = [v for values in points.values() for _, v in values]
  x0, x1, y0, y1 = min(steps), max(steps), min(losses), max(losses)
  image = Image.new("RGB", (WIDTH, HEIGHT), "white")
  draw = ImageDraw.Draw(image)

  def xy(step, loss):
    return (MARGIN + (step - x0) / (x1 - x0) * (WIDTH - 2 * MARGIN),
            HEIGHT - MARGIN - (loss - y0) / (y1 - y0) * (HEIGHT - 2 * MARGIN))

  draw.rectangle([MARGIN, MARGIN, WIDTH - MARGIN, HEIGHT - MARGIN], outline="black")
  for i in range(5):
    loss = y0 + (y1 - y0) * i / 4
    _, y = xy(x0, loss)
    draw.text((4, y - 5), f"{loss:.4f}", fill="black")
    step = x0 + (x1 - x0) * i / 4
    x, _ = xy(step, y0)
    draw.text((x - 12, HEIGHT - MARGIN + 6), f"{step:.0f}", fill="black")
  draw.text((WIDTH // 2 - 60, HEIGHT - 18), "training step", fill="black")
  draw.text((MARGIN, 8), "training loss (mean over 500 steps)", fill="black")
  for i, (name, values) in enumerate(sorted(points.items())):
    colour = COLOURS[i % len(COLOURS)]
    draw.line([xy(s, v) for s, v in values], fill=colour, width=2)
    draw.text((WIDTH - MARGIN - 60, MARGIN + 8 + 14 * i), name, fill=colour)
  image.save(out)


if __name__ == "__main__":
  plot(read_curves(sys.argv[1]), sys.argv[2])
