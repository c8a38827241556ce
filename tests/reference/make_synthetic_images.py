"""Record the synthetic benchmark's images that README's demo numbers were measured on (run by
hand, only when a renderer change is meant; then re-measure README's demo table too):

    .venv/bin/python -m tests.reference.make_synthetic_images

Writes `synthetic_images.json` beside this file: every class's first three benchmark images as
block sums (tests/test_synthetic_renderers.py says why), with the versions that drew them.
"""

from __future__ import annotations

import json

import numpy as np
import scipy

from tests.test_synthetic_renderers import RECORDED, recorded_images


def main() -> None:
    versions = json.dumps({"numpy": np.__version__, "scipy": scipy.__version__})
    images = ",\n".join(
        f"  {json.dumps(key)}: {json.dumps(sums, separators=(',', ':'))}"
        for key, sums in sorted(recorded_images().items())
    )
    RECORDED.write_text(f'{{"written_with": {versions},\n"images": {{\n{images}\n}}}}\n')


if __name__ == "__main__":
    main()
