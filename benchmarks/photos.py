"""Photos, not thumbnails: decoding 12-megapixel JPEGs, and indexing a folder of them.

The photos are made from real ones: scikit-image's sample photographs (a cat, a cup of
coffee, an astronaut, a rocket, ...), each copy cropped at random (80-100 % of each side),
mirrored or not, its brightness and contrast changed, upscaled to 4000 x 3000 with Lanczos,
given a little sensor-like noise (so it does not compress like a drawing) and saved as
JPEG quality 90; one in ten carries an EXIF orientation tag. Measured:

* decode ms per image to the model's input, with reduced decoding (Pillow's JPEG draft
  mode, as `decode_image` does) and without it (full decode, then resize), one thread;
* indexing: `build_index` with a backbone name (ImageNet features, no training) over the
  folder, embedding images/s as `imgsim index build` reports it, against the bare
  batched forward pass at the same input size: target >= 0.8.

    python -m benchmarks.photos --photos 500
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import PHOTO_NAMES, log, summarise, time_calls, write_json

SIZE = (4000, 3000)


def make_photo(args: tuple[int, Path]) -> int:
    from skimage import data as skdata

    i, folder = args
    rng = np.random.default_rng(i)
    img = Image.fromarray(getattr(skdata, PHOTO_NAMES[i % len(PHOTO_NAMES)])()).convert("RGB")
    w, h = img.size
    cw, ch = int(w * rng.uniform(0.8, 1)), int(h * rng.uniform(0.8, 1))
    x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    img = img.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    big = img.resize(SIZE, Image.Resampling.LANCZOS)
    pixels = np.asarray(big, dtype=np.float32) * rng.uniform(0.8, 1.2) + rng.uniform(-20, 20)
    pixels += rng.normal(0, 3, pixels.shape).astype(np.float32)
    out = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    exif = Image.Exif()
    if i % 10 == 0:
        exif[0x0112] = 6  # rotate 90 degrees on display
    out.save(folder / f"{i // 100:02d}" / f"IMG_{i:04d}.jpg", quality=90, exif=exif)
    return i


def decode_ms(files: list[Path], size: int) -> dict[str, dict]:
    from models.data import decode_image

    def full(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0))

    raw = [f.read_bytes() for f in files]
    out = {}
    for name, fn in (("reduced", lambda d: decode_image(d, size)), ("full", full)):
        times = []
        for data in raw:
            t = time.perf_counter()
            fn(data)
            times.append(time.perf_counter() - t)
        out[name] = summarise(times)
        log(f"decode {name}: {out[name]['median_ms']:.1f} ms per photo")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.photos", description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", type=int, default=500, help="12-megapixel JPEGs to make (default %(default)s)")
    p.add_argument("--model", default="resnet50", help="backbone name or MODEL_DIR (default %(default)s: 224 px)")
    p.add_argument("--decode-sample", type=int, default=40, help="photos timed for decoding (default 40)")
    p.add_argument("--runtime", default="tf", help="inference runtime of both measurements (default %(default)s)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    from indexer.build import build_index
    from models.embedder import Embedder
    from models.inference import load_trained
    from models.settings import get_settings

    settings = get_settings().model_copy(update={"runtime": args.runtime})

    with tempfile.TemporaryDirectory(prefix="imgsim-photos-") as tmp:
        folder = Path(tmp) / "photos"
        for d in range(-(-args.photos // 100)):
            (folder / f"{d:02d}").mkdir(parents=True)
        t0 = time.perf_counter()
        with ProcessPoolExecutor(2) as pool:
            list(pool.map(make_photo, [(i, folder) for i in range(args.photos)]))
        files = sorted(folder.rglob("*.jpg"))
        mb = sum(f.stat().st_size for f in files) / 1e6
        log(f"{len(files)} photos of {SIZE[0]}x{SIZE[1]} ({mb:.0f} MB) made in {time.perf_counter() - t0:.0f} s")
        embedder = Embedder(load_trained(args.model), settings=settings)
        size = embedder.input_size
        decode = decode_ms(files[: args.decode_sample], size)
        from models.data import decode_image

        batch = np.stack([decode_image(f.read_bytes(), size) for f in files[:32]])
        bare = summarise(time_calls(lambda: embedder(batch), min_reps=3, max_reps=10, budget_s=20))
        bare_rate = 32 / (bare["median_ms"] / 1000)
        r = build_index(
            Path(args.model), str(folder), Path(tmp) / "index", labels="none", progress=False, settings=settings
        )
        ratio = r.images_per_second / bare_rate
        log(f"indexing: {r.images_per_second:.1f} img/s vs bare batch-32 forward {bare_rate:.1f} img/s: {ratio:.3f}")
    result = {
        "kind": "photos", "photos": len(files), "megapixels": SIZE[0] * SIZE[1] / 1e6, "total_mb": round(mb),
        "model": args.model, "runtime": embedder.runtime, "input_size": size, "decode": decode,
        "bare_batch32_images_per_s": round(bare_rate, 2), "index_embed_images_per_s": round(r.images_per_second, 2),
        "indexed": r.count, "ratio": round(ratio, 3),
    }  # fmt: skip
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
